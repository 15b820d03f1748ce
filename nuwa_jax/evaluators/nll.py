"""Held-out negative log-likelihood of NUWA-Infinity in bits per token.

Fixed held-out chains (the same every time) are scored teacher-forced in each order asked for
(right, left, down, up: column- or row-major rasters; around: outward rings from the central
patch). Keys: `bits` (all orders), `bits/<order>`, `bits/<order>/<dataset>`, for the first
order also `bits/grid_<f>x<r>x<c>` and `bits/patch_<i>` (i-th patch of the order), and with
`empty_pool` the same chains with every context entry hidden: `bits_empty_pool` and
`context_gain` = bits_empty_pool - bits, the measured value of the Nearby Context Pool.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterator, Sequence

import numpy as np

from nuwa_jax.evaluators.common import Skipped, bits

ORDERS = ("right", "left", "down", "up", "around")


class _Mean:
  def __init__(self):
    self.total = collections.defaultdict(float)
    self.count = collections.defaultdict(int)

  def add(self, key: str, values: np.ndarray):
    self.total[key] += float(np.sum(values))
    self.count[key] += int(np.size(values))

  def items(self):
    return ((k, bits(self.total[k] / self.count[k])) for k in self.total if self.count[k])


class Evaluator:
  NEEDS = ("chains", "chain_nll", "dataset_names")

  def __init__(self, chains: Callable, chain_nll: Callable, dataset_names: Sequence[str],
               orders: Sequence[str] = ("right",), num_chains: int = 6,
               empty_pool: bool = True, per_grid: bool = True, per_patch: bool = True):
    """Args:
      chains: chains(order, count) -> iterator of held-out ChainBatch (fixed, deterministic).
      chain_nll: chain_nll(params, chain, empty_pool) -> per-patch, per-example nats [N, B].
      dataset_names: names of the mixed datasets (ChainBatch.kind indexes them).
      orders: orders to score, from ORDERS.
      num_chains: held-out batches of chains per order.
    """
    bad = [o for o in orders if o not in ORDERS]
    if bad or not orders:
      raise ValueError(f"orders={tuple(orders)}: expected a non-empty subset of {ORDERS}")
    if num_chains < 1:
      raise ValueError(f"num_chains={num_chains}: expected >= 1")
    self.chains, self.chain_nll, self.names = chains, chain_nll, tuple(dataset_names)
    self.orders, self.num_chains = tuple(orders), int(num_chains)
    self.empty_pool, self.per_grid, self.per_patch = empty_pool, per_grid, per_patch

  def run(self, state) -> Iterator[tuple[str, object]]:
    params = getattr(state, "params", state)
    full, empty = _Mean(), _Mean()
    for k, order in enumerate(self.orders):
      try:
        chains = list(self.chains(order, self.num_chains))
      except ValueError as e:  # an order the pool or the context entries cannot serve
        yield f"{order}", Skipped(str(e))
        continue
      for chain in chains:
        nll = np.asarray(self.chain_nll(params, chain, False))  # [N, B]
        keys = ["", f"/{order}"]
        if chain.kind is not None and len(self.names) > 1:
          keys.append(f"/{order}/{self.names[chain.kind]}")
        if k == 0 and self.per_grid:
          keys.append("/grid_" + "x".join(str(g) for g in chain.grid))
        for key in keys:
          full.add("bits" + key, nll)
        if k == 0 and self.per_patch:
          for i in range(nll.shape[0]):
            full.add(f"bits/patch_{i}", nll[i])
        if k == 0 and self.empty_pool:
          empty.add("bits_empty_pool", np.asarray(self.chain_nll(params, chain, True)))
    scores = dict(full.items())
    yield from scores.items()
    for key, value in empty.items():  # the same chains as bits/<first order>
      yield key, value
      yield "context_gain", value - scores[f"bits/{self.orders[0]}"]
