"""Block-FID: FID over non-overlapping blocks of large generated pictures (wide canvases or
outpaintings) against the same blocks of held-out real pictures.

Blocks (`evaluators.blocks.tile_blocks`): a grid anchored at the top-left pixel, tiles of
`block` pixels (default the model's patch in pixels), partial tiles at the right and bottom
edges dropped; `region="generated"` leaves out tiles lying wholly in the given part of an
outpainting, `"all"` keeps every whole tile. One FID over all tiles of all samples, with a
bootstrap interval over samples. The paper's exact recipe is not public: this is ours, and
every setting is written beside the value (`blocks`, `block_h`, `block_w`, ...).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from nuwa_jax.evaluators import blocks, networks, statistics
from nuwa_jax.evaluators.common import Skipped
from nuwa_jax.evaluators.fid import SampleEvaluator
from nuwa_jax.evaluators.sampling import gather_rows


class Evaluator(SampleEvaluator):
  NEEDS = ("samples", "references")

  def __init__(self, samples, references, task: str = "unconditional", dataset: str = "",
               num_samples: int = 16, height: int = 0, width: int = 0,
               width_factor: int = 4, direction: str = "right", block: tuple = (),
               region: str = "generated", reference_images: int = 64, seed: int = 0,
               guidance: float = 1.0, top_k: int = 0, temperature: float = 1.0,
               inception: str = "", bootstrap: int = 100, save_samples: int = 4):
    """width: canvas width in pixels; 0: `width_factor` x the trained patch width (for
    outpainting: the given picture is the held-out picture at the trained size)."""
    if region not in ("generated", "all"):
      raise ValueError(f"region={region!r}: expected 'generated' or 'all'")
    if task not in ("unconditional", "outpaint", "text_to_image"):
      raise ValueError(f"task={task!r}: Block-FID takes unconditional, text_to_image or "
                       "outpaint")
    self.width_factor = int(width_factor)
    super().__init__(samples, references, task, dataset, num_samples, seed, save_samples,
                     dict(height=height, width=width or self.width_factor *
                          samples.patch_px[1], guidance=guidance, top_k=top_k,
                          temperature=temperature, direction=direction))
    self.block = tuple(block) or tuple(samples.patch_px)
    self.region, self.reference_images = region, int(reference_images)
    self.inception_path, self.bootstrap = inception, int(bootstrap)

  def run(self, state) -> Iterator[tuple[str, object]]:
    net = networks.load("inception", self.inception_path)
    if isinstance(net, Skipped):
      yield "block_fid", net
      return
    height, width = self.samples.size(self.spec)
    given = None
    if self.spec.task == "outpaint":
      ph, pw = self.samples.patch_px
      if self.spec.direction in ("right", "left"):
        gh, gw = height, max(pw, (width // 2) // pw * pw)
      else:
        gh, gw = max(ph, (height // 2) // ph * ph), width
      given = self.held_out().images(self.num_samples, gh, gw)
    drawn, _ = self.draw(state, f"block_fid_{self.spec.task}", given)
    per_image = []
    for px in drawn.pixels:
      tiles = blocks.tile_blocks(px, self.block, drawn.given, self.region)
      per_image.append(np.asarray(net(tiles)["pool3"], np.float64) if len(tiles) else
                       np.zeros((0, 2048)))
    counts = gather_rows(np.array([[len(f)] for f in per_image]))[:, 0]
    feats = gather_rows(np.concatenate(per_image))
    per_image = np.split(feats, np.cumsum(counts)[:-1])
    ref, _, _ = self.refs.features(self.dataset, net, "pool3", self.reference_images,
                                   (height, self.samples.patch_px[1] * self.width_factor
                                    if self.spec.task != "outpaint" else width), self.block)
    fake = statistics.FeatureStats()
    fake.update(feats)
    yield "block_fid", statistics.fid_from_stats(fake, ref)
    # Centred: resampled FIDs carry the small-sample bias twice; the interval keeps their
    # spread around the point estimate (statistics.bootstrap_fid).
    low, high = statistics.bootstrap_fid(per_image, ref, num_resamples=self.bootstrap,
                                         seed=self.spec.seed, method="centred")
    yield "block_fid_low", low
    yield "block_fid_high", high
    yield "blocks", len(feats)
    yield "reference_blocks", ref.count
    yield "block_h", self.block[0]
    yield "block_w", self.block[1]
    yield "canvas_h", height
    yield "canvas_w", width
    yield "region_generated", float(self.region == "generated")
    yield "num_samples", len(per_image)
