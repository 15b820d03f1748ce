"""CLIP-SIM: the raw cosine between L2-normalised CLIP image and caption features.

No x100 scale and no clipping at 0 (some papers report 100 * max(cos, 0)); the held-out real
pictures scored against their own captions (`clip_sim_real`) give the ceiling to compare with.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from nuwa_jax.evaluators import networks
from nuwa_jax.evaluators.common import Skipped
from nuwa_jax.evaluators.fid import SampleEvaluator
from nuwa_jax.evaluators.sampling import gather_rows


class Evaluator(SampleEvaluator):
  NEEDS = ("samples", "references")

  def __init__(self, samples, references, task: str = "text_to_image", dataset: str = "",
               num_samples: int = 64, height: int = 0, width: int = 0, seed: int = 0,
               guidance: float = 1.0, top_k: int = 0, temperature: float = 1.0,
               clip: str = "", save_samples: int = 8):
    if task != "text_to_image":
      raise ValueError(f"task={task!r}: CLIP-SIM scores text_to_image samples")
    super().__init__(samples, references, task, dataset, num_samples, seed, save_samples,
                     dict(height=height, width=width, guidance=guidance, top_k=top_k,
                          temperature=temperature))
    self.clip_path = clip

  def run(self, state) -> Iterator[tuple[str, object]]:
    net = networks.load("clip", self.clip_path)
    if isinstance(net, Skipped):
      yield "clip_sim", net
      return
    drawn, captions = self.draw(state, "clip_sim")
    sims = gather_rows(np.asarray(net.clip_sim(drawn.pixels, captions), np.float64)[:, None])
    yield "clip_sim", float(sims.mean())
    yield "clip_sim_std", float(sims.std())
    height, width = self.samples.size(self.spec)
    real = self.held_out().images(self.num_samples, height, width)
    yield "clip_sim_real", float(np.mean(net.clip_sim(real, self.held_out().captions(
        self.num_samples))))
    yield "num_samples", len(sims)
