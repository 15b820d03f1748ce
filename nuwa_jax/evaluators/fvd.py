"""FVD and frame-FID of generated videos against held-out real clips.

FVD: the Fréchet distance of I3D (Kinetics-400) logits averaged over time; clips shorter than
the network takes are lengthened as `models.i3d` documents. Frame-FID: FID over every frame,
pool3 features of the FID Inception-v3. Either is skipped when its weights are missing.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from nuwa_jax.evaluators import networks, statistics
from nuwa_jax.evaluators.common import Skipped
from nuwa_jax.evaluators.fid import SampleEvaluator
from nuwa_jax.evaluators.references import featurizer
from nuwa_jax.evaluators.sampling import gather_rows


class Evaluator(SampleEvaluator):
  NEEDS = ("samples", "references")

  def __init__(self, samples, references, task: str = "text_to_video", dataset: str = "",
               num_samples: int = 32, height: int = 0, width: int = 0, frames: int = 8,
               seed: int = 0, guidance: float = 1.0, top_k: int = 0,
               temperature: float = 1.0, i3d: str = "", inception: str = "",
               save_samples: int = 4):
    if task not in ("text_to_video", "animate"):
      raise ValueError(f"task={task!r}: expected text_to_video or animate")
    super().__init__(samples, references, task, dataset, num_samples, seed, save_samples,
                     dict(height=height, width=width, guidance=guidance, top_k=top_k,
                          temperature=temperature, frames=frames))
    self.i3d_path, self.inception_path = i3d, inception

  def run(self, state) -> Iterator[tuple[str, object]]:
    i3d = networks.load("i3d", self.i3d_path)
    inception = networks.load("inception", self.inception_path)
    if isinstance(i3d, Skipped) and isinstance(inception, Skipped):
      yield "fvd", i3d
      yield "frame_fid", inception
      return
    height, width = self.samples.size(self.spec)
    given = None
    if self.spec.task == "animate":
      given = self.held_out().images(self.num_samples, height, width)
    drawn, _ = self.draw(state, f"fvd_{self.spec.task}", given)
    size = (self.spec.frames, height, width)
    for name, net, feature in (("fvd", i3d, "i3d"), ("frame_fid", inception, "frames_pool3")):
      if isinstance(net, Skipped):
        yield name, net
        continue
      feats = gather_rows(np.asarray(featurizer(net, feature)(drawn.pixels), np.float64))
      ref, _, _ = self.refs.features(self.dataset, net, feature, self.num_samples, size)
      fake = statistics.FeatureStats()
      fake.update(feats)
      yield name, statistics.fid_from_stats(fake, ref)
    yield "num_samples", len(drawn.pixels)
