"""Held-out loss and accuracy of a token model's eval step over fixed batches (the baseline).

Keys: every metric the eval step returns, averaged over `num_batches` fixed held-out batches
(`nll` in nats per token and `bits` = nll / ln 2 when the step returns `nll`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np

from nuwa_jax.evaluators.common import bits


class Evaluator:
  NEEDS = ("eval_batches", "eval_step")

  def __init__(self, eval_batches: Callable, eval_step: Callable, num_batches: int = 4):
    """eval_batches(count) -> iterator of global batches; eval_step(params, batch) -> dict."""
    if num_batches < 1:
      raise ValueError(f"num_batches={num_batches}: expected >= 1")
    self.batches, self.step, self.num_batches = eval_batches, eval_step, int(num_batches)

  def run(self, state) -> Iterator[tuple[str, float]]:
    params = getattr(state, "params", state)
    results = jax.device_get([self.step(params, b) for b in self.batches(self.num_batches)])
    means = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
    yield from means.items()
    if "nll" in means:
      yield "bits", bits(means["nll"])
