"""Caption following on the synthetic scenes and clips, read by their exact scorers.

`data.synthetic_scenes.score_image` / `score_clip` segment the palette colours, identify kinds
by template and check places, relations and motion: `score` is the mean of three equal parts
(colour, kind, layout or motion), `exact` the share of samples with every check passed.
Held-out captions of `dataset`, one sample each.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from nuwa_jax.data import synthetic_scenes
from nuwa_jax.evaluators.fid import SampleEvaluator
from nuwa_jax.evaluators.sampling import gather_rows


class Evaluator(SampleEvaluator):
  NEEDS = ("samples", "references")

  def __init__(self, samples, references, task: str = "text_to_image", dataset: str = "",
               num_samples: int = 200, height: int = 0, width: int = 0, frames: int = 8,
               seed: int = 0, guidance: float = 3.0, top_k: int = 64,
               temperature: float = 1.0, save_samples: int = 8):
    if task not in ("text_to_image", "text_to_video"):
      raise ValueError(f"task={task!r}: expected text_to_image or text_to_video")
    super().__init__(samples, references, task, dataset, num_samples, seed, save_samples,
                     dict(height=height, width=width, guidance=guidance, top_k=top_k,
                          temperature=temperature,
                          frames=frames if task == "text_to_video" else 1))

  def run(self, state) -> Iterator[tuple[str, object]]:
    drawn, captions = self.draw(state, f"captions_{self.spec.task}")
    rows = []
    for px, caption in zip(drawn.pixels, captions):
      if self.spec.task == "text_to_image":
        r = synthetic_scenes.score_image(px, caption)
      else:
        r = synthetic_scenes.score_clip(px, caption)
      rows.append([r.score, float(r.exact)])
    rows = gather_rows(np.asarray(rows, np.float64))
    yield "score", float(rows[:, 0].mean())
    yield "exact", float(rows[:, 1].mean())
    yield "num_samples", len(rows)
