"""The Nearby Context Pool schedule against a brute-force reference, and the orders."""

import itertools

import numpy as np
import pytest

from nuwa_jax import context_pool as cp
from nuwa_jax import orders


def brute_force_context(order, extent):
  e_t, e_h, e_w = cp.extent3(extent)
  out = []
  for i, (t, r, c) in enumerate(order):
    out.append({j for j, (t2, r2, c2) in enumerate(order[:i])
                if abs(t2 - t) <= e_t and abs(r2 - r) <= e_h and abs(c2 - c) <= e_w})
  return out


def random_case(rng):
  grid = (int(rng.integers(1, 3)), int(rng.integers(1, 6)), int(rng.integers(1, 8)))
  extent = (int(rng.integers(0, 2)), int(rng.integers(0, 3)), int(rng.integers(0, 3)))
  kind = rng.integers(3)
  if kind == 0:
    order = orders.sample_order(rng, grid)
  else:  # any permutation is a valid order for the schedule
    coords = [(t, r, c) for t in range(grid[0]) for r in range(grid[1]) for c in range(grid[2])]
    order = [coords[i] for i in rng.permutation(len(coords))]
  return grid, extent, order


@pytest.mark.parametrize("seed", range(40))
def test_schedule_equals_brute_force_reference(seed):
  rng = np.random.default_rng(seed)
  grid, extent, order = random_case(rng)
  sched = cp.make_schedule(order, extent)
  want = brute_force_context(order, extent)
  pool = {}  # slot -> step index of the patch held there
  for i, (t, r, c) in enumerate(order):
    got = set(sched.context_step[i][sched.context_valid[i]].tolist())
    assert got == want[i]
    for k in np.flatnonzero(sched.context_valid[i]):
      j = int(sched.context_step[i, k])
      assert pool[int(sched.context_slot[i, k])] == j  # gathered from the right slot
      dt, dr, dc = (np.asarray(order[j]) - np.asarray(order[i])).tolist()
      assert cp.offset_index(dt, dr, dc, extent) == k  # entry k always carries offset k
    # cache: the slot written must not hold a patch that is still needed.
    slot = int(sched.write_slot[i])
    if slot in pool:
      assert sched.last_use[pool[slot]] < i
    pool[slot] = i
    held = sum(1 for j in range(i + 1) if sched.last_use[j] >= i)
    assert sched.occupancy[i] == held
  last = {j: max([i for i in range(len(order)) if j in want[i]], default=j)
          for j in range(len(order))}
  assert sched.last_use.tolist() == [last[j] for j in range(len(order))]
  assert sched.peak_occupancy <= len(order)
  assert sched.context_slot.shape == (len(order), cp.num_offsets(extent))


def test_pool_does_not_grow_with_width_for_column_major_orders():
  for rows, extent in ((4, (2, 2)), (2, (1, 1)), (8, (2, 2))):
    peaks = {w: cp.schedule_for((rows, w), extent, "right").peak_occupancy
             for w in (4, 8, 16, 32, 64, 256)}
    assert len(set(peaks.values())) == 1, peaks
    # ... about e_w + 1 columns of the canvas's height.
    assert peaks[64] <= (extent[1] + 1) * rows
    grows = {w: cp.schedule_for((rows, w), extent, "down").peak_occupancy for w in (8, 64)}
    assert grows[64] > grows[8]  # row-major holds whole rows: wide canvases cost more
  # Video, frame by frame: bounded by frames within e_t, not by the clip length.
  peaks = {f: cp.schedule_for((f, 2, 2), (1, 1, 1), "down").peak_occupancy for f in (4, 16)}
  assert peaks[4] == peaks[16]


def test_too_small_pool_is_a_clear_error():
  with pytest.raises(ValueError, match="needs 11 pool slots .* the pool has 8"):
    cp.schedule_for((4, 16), (2, 2), "right", pool_slots=8)


def test_offsets_round_trip_and_bounds():
  extent = (1, 2, 2)
  seen = set()
  for k in range(cp.num_offsets(extent)):
    off = cp.offset_of(k, extent)
    assert cp.offset_index(*off, extent) == k
    seen.add(off)
  assert seen == set(itertools.product(range(-1, 2), range(-2, 3), range(-2, 3)))
  with pytest.raises(ValueError, match="outside extent"):
    cp.offset_index(0, 3, 0, extent)


def test_raster_orders_grow_in_their_direction():
  grid = (3, 5)
  for direction, first in (("right", (0, 0, 0)), ("left", (0, 0, 4)), ("down", (0, 0, 0)),
                           ("up", (0, 2, 0))):
    order = orders.raster(grid, direction)
    orders.check_order(grid, order)
    assert order[0] == first
  right = orders.raster(grid, "right")
  assert [p[2] for p in right] == sorted(p[2] for p in right)  # whole columns left to right
  left = orders.raster(grid, "left", inner="up")
  assert left[:3] == [(0, 2, 4), (0, 1, 4), (0, 0, 4)]
  up = orders.raster(grid, "up")
  assert [p[1] for p in up] == sorted((p[1] for p in up), reverse=True)
  video = orders.raster((2, 2, 2), "down")
  assert [p[0] for p in video] == [0] * 4 + [1] * 4  # frame after frame
  with pytest.raises(ValueError, match="direction='sideways'"):
    orders.raster(grid, "sideways")


def test_rings_start_with_the_region_and_grow_outward():
  grid, region = (6, 7), (2, 3, 4, 5)
  order = orders.rings(grid, region)
  orders.check_order(grid, order)
  inside = {(0, r, c) for r in range(2, 4) for c in range(3, 5)}
  assert set(order[:4]) == inside

  def dist(p):
    return max(region[0] - p[1], p[1] - region[2] + 1, region[1] - p[2], p[2] - region[3] + 1, 0)
  ds = [dist(p) for p in order]
  assert ds == sorted(ds)
  with pytest.raises(ValueError, match="region"):
    orders.rings(grid, (0, 0, 7, 1))


def test_sampled_orders_cover_every_direction():
  rng = np.random.default_rng(0)
  firsts = set()
  for _ in range(200):
    order = orders.sample_order(rng, (3, 4))
    orders.check_order((3, 4), order)
    firsts.add(order[0])
  assert {(0, 0, 0), (0, 0, 3), (0, 2, 0), (0, 2, 3)} <= firsts
  with pytest.raises(ValueError, match="exactly once"):
    orders.check_order((2, 2), [(0, 0, 0)] * 4)


@pytest.mark.parametrize("seed", range(10))
def test_compact_context_keeps_every_valid_entry_with_its_offset(seed):
  rng = np.random.default_rng(100 + seed)
  _, extent, order = random_case(rng)
  sched = cp.make_schedule(order, extent)
  assert (cp.count_valid_context(order, extent) == sched.context_valid.sum(1)).all()
  m = sched.max_valid + int(rng.integers(0, 3))
  got = sched.compact(m)
  assert all(v.shape == (len(order), m) for v in got.values())
  for i in range(len(order)):
    want = {(int(sched.context_slot[i, k]), k) for k in np.flatnonzero(sched.context_valid[i])}
    valid = got["context_valid"][i]
    pairs = set(zip(got["context_slot"][i][valid].tolist(),
                    got["context_offset"][i][valid].tolist()))
    assert pairs == want and valid.sum() == len(want)
    assert not valid[valid.sum():].any()  # valid entries first
  full = sched.compact(None)  # one entry per offset: entry k carries offset k
  assert (full["context_offset"] == np.arange(cp.num_offsets(extent))).all()
  assert (full["context_valid"] == sched.context_valid).all()
  if sched.max_valid:
    with pytest.raises(ValueError, match=f"has {sched.max_valid} valid context entries but "
                                         f"the step takes max_context={sched.max_valid - 1}"):
      sched.compact(sched.max_valid - 1)


def test_max_valid_context_bounds_every_library_order():
  # extent (0, 1, 1): a raster sees at most 4 of its 8 neighbours before it, rings 5.
  assert cp.max_valid_context([(1, 8, 8)], (0, 1, 1), "right") == 4
  assert cp.max_valid_context([(1, 8, 8)], (0, 1, 1)) == 5
  assert cp.max_valid_context([(1, 1, 1)], (1, 2, 2)) == 0  # a single patch has no context
  rng = np.random.default_rng(0)
  grids, extent = [(1, 3, 4), (2, 2, 3)], (1, 2, 1)
  bound = cp.max_valid_context(grids, extent)
  seen = max(cp.make_schedule(orders.sample_order(rng, grids[i % 2]), extent).max_valid
             for i in range(200))
  assert seen == bound  # attained, never exceeded
  stacked = cp.stack_schedules([cp.schedule_for((3, 4), extent, d) for d in ("right", "up")],
                               bound)
  assert stacked["context_offset"].shape == stacked["context_slot"].shape == (12, 2, bound)
