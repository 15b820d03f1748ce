"""Nearby Context Pool schedule, computed on the host: select, cache, remove.

For a grid of patches, an order and an extent (e_t, e_h, e_w):
  select  context(i) = {j before i in the order : |dt| <= e_t, |dr| <= e_h, |dc| <= e_w}
  cache   after patch i, its per-layer hidden states are stored in a free pool slot
  remove  last_use(j) = max{i : j in context(i)}; j's slot is freed once step last_use(j) ends

Static shapes for jit: the schedule lists each step's context as a vector of
K = (2e_t+1)(2e_h+1)(2e_w+1) entries, one per relative offset (dt, dr, dc) in a fixed order
(entry k has offset `offset_of(k)`); entries with no patch are invalid. Few of them are ever
valid (a patch's own offset never is, and an order visits about half of a patch's neighbours
before it), so what a step is fed is the compact form (`Schedule.compact`): `max_context`
entries, the valid ones first, each a (pool slot, offset index, valid) triple; the model picks
each entry's learned offset bias by its offset index. `max_valid_context` gives the largest
number of valid entries the library's orders can produce on given grids. The pool itself has a
fixed number of storage slots (`pool_slots`); `Schedule.peak_occupancy` says how many an order
needs (column-major orders on a fixed-height canvas need about (e_w + 1) columns, however wide
the canvas).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from nuwa_jax import orders as orders_lib


def extent3(extent: Sequence[int]) -> tuple[int, int, int]:
  """(e_h, e_w) or (e_t, e_h, e_w) → (e_t, e_h, e_w)."""
  extent = tuple(int(e) for e in extent)
  if len(extent) == 2:
    extent = (0,) + extent
  if len(extent) != 3 or min(extent) < 0:
    raise ValueError(f"extent={extent}: expected (e_h, e_w) or (e_t, e_h, e_w) >= 0.")
  return extent


def num_offsets(extent: Sequence[int]) -> int:
  e_t, e_h, e_w = extent3(extent)
  return (2 * e_t + 1) * (2 * e_h + 1) * (2 * e_w + 1)


def offset_index(dt: int, dr: int, dc: int, extent: Sequence[int]) -> int:
  """Position of relative offset (dt, dr, dc) (context minus current) in the context vector."""
  e_t, e_h, e_w = extent3(extent)
  if abs(dt) > e_t or abs(dr) > e_h or abs(dc) > e_w:
    raise ValueError(f"offset {(dt, dr, dc)} is outside extent {(e_t, e_h, e_w)}.")
  return ((dt + e_t) * (2 * e_h + 1) + (dr + e_h)) * (2 * e_w + 1) + (dc + e_w)


def offset_of(index: int, extent: Sequence[int]) -> tuple[int, int, int]:
  e_t, e_h, e_w = extent3(extent)
  rest, dc = divmod(index, 2 * e_w + 1)
  dt, dr = divmod(rest, 2 * e_h + 1)
  return dt - e_t, dr - e_h, dc - e_w


@dataclasses.dataclass
class Schedule:
  """Per-step arrays of one chain (N patches, K context entries).

  Attributes:
    order: int32 [N, 3] patch coordinates (t, r, c) in generation order.
    context_slot: int32 [N, K] pool slot of each context entry (0 where invalid).
    context_valid: bool [N, K] whether entry k of step i has a patch.
    context_step: int32 [N, K] step index of that patch (-1 where invalid).
    write_slot: int32 [N] pool slot that patch i's hidden states are written to.
    occupancy: int32 [N] patches held in the pool right after patch i is cached.
  """
  order: np.ndarray
  extent: tuple[int, int, int]
  context_slot: np.ndarray
  context_valid: np.ndarray
  context_step: np.ndarray
  write_slot: np.ndarray
  occupancy: np.ndarray
  last_use: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.order)

  @property
  def peak_occupancy(self) -> int:
    return int(self.occupancy.max())

  @property
  def max_valid(self) -> int:
    """The largest number of valid context entries of any step."""
    return int(self.context_valid.sum(1).max(initial=0))

  def compact(self, max_context: int | None = None) -> dict[str, np.ndarray]:
    """Each step's context as `max_context` entries, valid ones first (in offset order).

    Returns int32 context_slot [N, M] (pool slot), int32 context_offset [N, M] (offset index
    into the K offsets, for the offset bias), bool context_valid [N, M]; padding entries are
    (slot 0, offset 0, invalid). max_context None: M = K, entry k = offset k (no compaction).
    Raises:
      ValueError: a step has more than `max_context` valid entries.
    """
    n, k = self.context_valid.shape
    if max_context is None:
      return {"context_slot": self.context_slot,
              "context_offset": np.broadcast_to(np.arange(k, dtype=np.int32), (n, k)).copy(),
              "context_valid": self.context_valid}
    if self.max_valid > max_context:
      i = int(self.context_valid.sum(1).argmax())
      raise ValueError(
          f"step {i} of this order (patch {tuple(self.order[i].tolist())}) has "
          f"{self.max_valid} valid context entries but the step takes max_context="
          f"{max_context} (config model.max_context; 0 computes it from config.grids, "
          "config.order and the extent).")
    # Stable sort: valid entries first, each group in offset order (padded if M > K).
    index = np.argsort(~self.context_valid, axis=1, kind="stable")[:, :max_context]
    pad = ((0, 0), (0, max_context - index.shape[1]))
    index = np.pad(index.astype(np.int32), pad)
    valid = np.pad(np.take_along_axis(self.context_valid, index[:, :k], 1), pad)
    return {"context_slot": np.where(valid, np.take_along_axis(self.context_slot, index, 1),
                                     0).astype(np.int32),
            "context_offset": np.where(valid, index, 0).astype(np.int32),
            "context_valid": valid}


def make_schedule(order: Sequence[Sequence[int]], extent: Sequence[int],
                  pool_slots: int | None = None) -> Schedule:
  """The select / cache / remove schedule of `order` (a list of (t, r, c)).

  Args:
    order: patch coordinates in generation order (each patch once).
    extent: (e_h, e_w) or (e_t, e_h, e_w).
    pool_slots: storage slots available; None: as many as the schedule needs.
  Raises:
    ValueError: the order repeats a patch, or it needs more than `pool_slots` slots.
  """
  ext = extent3(extent)
  e_t, e_h, e_w = ext
  coords = np.asarray(order, np.int32).reshape(-1, 3)
  n, k = len(coords), num_offsets(ext)
  step_of = {}
  for i, p in enumerate(map(tuple, coords.tolist())):
    if p in step_of:
      raise ValueError(f"order visits patch {p} twice.")
    step_of[p] = i

  context_step = np.full((n, k), -1, np.int32)
  offsets = [offset_of(j, ext) for j in range(k)]
  for i, (t, r, c) in enumerate(coords.tolist()):
    for j, (dt, dr, dc) in enumerate(offsets):
      other = step_of.get((t + dt, r + dr, c + dc))
      if other is not None and other < i:
        context_step[i, j] = other
  last_use = np.arange(n, dtype=np.int32)
  for i in range(n):
    used = context_step[i][context_step[i] >= 0]
    last_use[used] = np.maximum(last_use[used], i)

  free: list[int] = []
  next_new = 0
  slot_of = np.full(n, -1, np.int32)
  write_slot = np.zeros(n, np.int32)
  occupancy = np.zeros(n, np.int32)
  expiring: dict[int, list[int]] = {}
  for j in range(n):
    expiring.setdefault(int(last_use[j]), []).append(j)
  held = 0
  for i in range(n):
    if free:
      slot = min(free)
      free.remove(slot)
    else:
      slot, next_new = next_new, next_new + 1
    slot_of[i] = write_slot[i] = slot
    held += 1
    occupancy[i] = held
    for j in expiring.get(i, ()):  # remove: j is not needed after this step
      free.append(int(slot_of[j]))
      held -= 1
  valid = context_step >= 0
  context_slot = np.where(valid, slot_of[np.maximum(context_step, 0)], 0).astype(np.int32)
  schedule = Schedule(coords, ext, context_slot, valid, context_step, write_slot, occupancy,
                      last_use)
  if pool_slots is not None and schedule.peak_occupancy > pool_slots:
    raise ValueError(f"this order needs {schedule.peak_occupancy} pool slots at its peak but "
                     f"the pool has {pool_slots} (config model.pool_slots); raise it or use a "
                     "column-major order for wide canvases.")
  return schedule


def schedule_for(grid: Sequence[int], extent: Sequence[int], direction: str = "right",
                 pool_slots: int | None = None) -> Schedule:
  """Convenience: the schedule of a raster order growing in `direction`."""
  return make_schedule(orders_lib.raster(grid, direction), extent, pool_slots)


def stack_schedules(schedules: Sequence[Schedule], max_context: int | None = None
                    ) -> dict[str, np.ndarray]:
  """Per-step arrays of a batch of chains of equal length, as [N, B, ...]: context_slot,
  context_offset, context_valid [N, B, M] (see `Schedule.compact`; M = max_context or K) and
  write_slot [N, B]."""
  lengths = {s.num_steps for s in schedules}
  if len(lengths) != 1:
    raise ValueError(f"chains in a batch must have the same number of patches, got {lengths}.")
  compact = [s.compact(max_context) for s in schedules]
  out = {name: np.stack([c[name] for c in compact], 1)
         for name in ("context_slot", "context_offset", "context_valid")}
  out["write_slot"] = np.stack([s.write_slot for s in schedules], 1)
  return out


def count_valid_context(order: Sequence[Sequence[int]], extent: Sequence[int]) -> np.ndarray:
  """int [N]: how many patches within the extent precede each patch of `order` (the number of
  valid context entries of each step; vectorised, for enumerating many orders)."""
  e_t, e_h, e_w = extent3(extent)
  coords = np.asarray(order, np.int64).reshape(-1, 3)
  shape = coords.max(0) + 1
  pad = np.array([e_t, e_h, e_w])
  step = np.full(tuple(shape + 2 * pad), np.iinfo(np.int64).max)
  step[tuple((coords + pad).T)] = np.arange(len(coords))
  mine = np.arange(len(coords))
  count = np.zeros(len(coords), np.int64)
  for k in range(num_offsets((e_t, e_h, e_w))):
    off = np.asarray(offset_of(k, (e_t, e_h, e_w)))
    if not off.any():
      continue
    count += step[tuple((coords + pad + off).T)] < mine
  return count


def library_orders(grid: Sequence[int], order: str = "random") -> list[list[tuple[int, int, int]]]:
  """Every order `orders.sample_order` (order='random') can draw on `grid`: rasters in each
  direction with each inner direction and rings around every region; for a raster direction,
  the rasters only (every direction: evaluation and sampling may use another one)."""
  frames, rows, cols = orders_lib._grid(grid)  # pylint: disable=protected-access
  out = []
  for direction in orders_lib.DIRECTIONS:
    for inner in (("down", "up") if direction in ("right", "left") else ("right", "left")):
      out.append(orders_lib.raster((frames, rows, cols), direction, inner))
  if order == "random" and rows * cols > 1:
    for r0 in range(rows):
      for c0 in range(cols):
        for r1 in range(r0 + 1, rows + 1):
          for c1 in range(c0 + 1, cols + 1):
            out.append(orders_lib.rings((frames, rows, cols), (r0, c0, r1, c1)))
  return out


@functools.lru_cache(maxsize=None)
def sampling_context_entries(extent: Sequence[int]) -> int:
  """M for generation, where any library order may grow a canvas of any size: the most valid
  entries any such step has. Only the (2e+1)-box around a patch counts, so a grid holding the
  box around a patch in every position relative to the canvas edges and to a ring's seed
  region, (2e_t+1, 2e_h+3, 2e_w+3), has every case (tests compare larger grids)."""
  e_t, e_h, e_w = extent3(extent)
  return max_valid_context([(2 * e_t + 1, 2 * e_h + 3, 2 * e_w + 3)], (e_t, e_h, e_w))


def max_valid_context(grids: Sequence[Sequence[int]], extent: Sequence[int],
                      order: str = "random") -> int:
  """The largest number of valid context entries of any step of any of `library_orders` on
  any of `grids`: the default `max_context` of a configuration (0 for extent (0, 0, 0): a
  patch's only offset is itself, never valid)."""
  best = 0
  for grid in grids:
    for o in library_orders(grid, order):
      best = max(best, int(count_valid_context(o, extent).max()))
  return best
