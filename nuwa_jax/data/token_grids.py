"""Token-grid examples for the NUWA-Infinity transformer, and how chains are cut from them.

A token-grid example is {"tokens": int32 [frames, rows, cols] (images: frames = 1),
"text": int32 [text_len], "text_mask": bool [text_len]}. Training cuts a window of
(gt, gh, gw) patches from it (aligned to the token grid at a random offset), picks an order per
example, and feeds the chain patch by patch.

`SyntheticTokenGrids` is a generated stand-in with known structure, used by tests and when no
pre-tokenised dataset is given: a background of two token bands with noise, a few rectangles
of "colour" tokens, and optionally a right half that repeats the left half (so that context
from the pool is what predicts it).

`TokenMix` serves pre-tokenised datasets (one or several: images, captioned images, clips, of
any sizes): each global batch comes from one dataset and has one patch grid that fits every
example of that dataset, and its examples arrive already cut to that grid, so that examples of
different shapes batch together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nuwa_jax import context_pool
from nuwa_jax import orders as orders_lib


class SyntheticTokenGrids:
  """Random-access source of token grids.

  Args:
    num_examples, frames, rows, cols: dataset size and grid (in tokens).
    vocab: codebook size (>= 16).
    mirror: the right half repeats the left half exactly.
    moving: frames shift the scene one token to the right per frame (video).
    text_len: caption length (0: no text); the caption names the rectangles' colours.
    seed: dataset seed.
  """

  def __init__(self, num_examples: int, frames: int, rows: int, cols: int, vocab: int,
               mirror: bool = False, moving: bool = False, text_len: int = 0,
               noise: float = 0.05, seed: int = 0):
    if vocab < 16:
      raise ValueError(f"vocab={vocab}: SyntheticTokenGrids needs at least 16 codes.")
    if mirror and cols % 2:
      raise ValueError(f"mirror needs an even number of columns, got cols={cols}.")
    self.n, self.frames, self.rows, self.cols, self.vocab = num_examples, frames, rows, cols, vocab
    self.mirror, self.moving, self.text_len, self.noise, self.seed = (
        mirror, moving, text_len, noise, seed)

  def __len__(self):
    return self.n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.n:
      raise IndexError(index)
    rng = np.random.default_rng([self.seed, index])
    width = self.cols // 2 if self.mirror else self.cols
    pad = self.frames if self.moving else 0
    base = np.zeros((self.rows, width + pad), np.int32)
    base[self.rows // 2:] = 1
    colours = rng.integers(0, 7, size=3)
    for colour in colours:
      h, w = rng.integers(1, max(2, self.rows // 2) + 1), rng.integers(1, max(2, width // 2) + 1)
      r, c = rng.integers(0, self.rows - h + 1), rng.integers(0, width + pad - w + 1)
      base[r:r + h, c:c + w] = 2 + 2 * colour
      base[r + h - 1, c:c + w] = 3 + 2 * colour
    noisy = rng.random(base.shape) < self.noise
    base[noisy] = rng.integers(16, self.vocab, noisy.sum())
    frames = []
    for t in range(self.frames):
      view = base[:, (pad - t if self.moving else 0):][:, :width]
      frames.append(np.concatenate([view, view], 1) if self.mirror else view)
    text = np.zeros((self.text_len,), np.int32)
    if self.text_len:
      words = (3 + np.sort(colours))[:self.text_len]
      text[:len(words)] = words
    return {"tokens": np.stack(frames).astype(np.int32), "text": text, "text_mask": text != 0}


def crop_window(tokens: np.ndarray, window: Sequence[int], rng: np.random.Generator
                ) -> np.ndarray:
  """A random window of (frames, rows, cols) tokens of a [F, R, C] grid."""
  out = tokens
  for axis, size in enumerate(window):
    full = tokens.shape[axis]
    if size > full:
      raise ValueError(f"token grid {tokens.shape} is smaller than the window {tuple(window)}.")
    start = int(rng.integers(0, full - size + 1))
    out = np.take(out, np.arange(start, start + size), axis=axis)
  return out


def fits(grid: Sequence[int], min_grid: Sequence[int], patch: Sequence[int]) -> bool:
  """Whether a (frames, rows, cols) patch grid fits a [frames, rows, cols] token grid."""
  return (grid[0] <= min_grid[0] and grid[1] * patch[0] <= min_grid[1]
          and grid[2] * patch[1] <= min_grid[2])


def grids_per_dataset(grids: Sequence[Sequence[int]], min_grids: Sequence[Sequence[int]],
                      patch: Sequence[int], names: Sequence[str]) -> list[list[tuple]]:
  """For each dataset, the patch grids of `grids` that fit its smallest example.

  Raises:
    ConfigError: a grid fits no dataset, or a dataset fits no grid (naming config.grids).
  """
  from nuwa_jax.config_utils import ConfigError  # pylint: disable=g-import-not-at-top
  grids = [tuple(int(x) for x in g) for g in grids]
  out = [[g for g in grids if fits(g, m, patch)] for m in min_grids]
  smallest = ", ".join(f"{n} {tuple(m)}" for n, m in zip(names, min_grids))
  for g in grids:
    if not any(g in o for o in out):
      raise ConfigError(
          f"config.grids: the patch grid {g} needs {g[0]} frames of {g[1] * patch[0]}x"
          f"{g[2] * patch[1]} tokens, more than the smallest example of every dataset "
          f"(frames, rows, cols in tokens: {smallest}); remove it from config.grids or "
          "pre-tokenise at a larger --short_side.")
  for name, m, o in zip(names, min_grids, out):
    if not o:
      raise ConfigError(f"config.grids={grids}: no grid fits {name} (smallest example "
                        f"{tuple(m)} tokens, patches {tuple(patch)}); add a smaller grid.")
  return out


def interleave(weights: Sequence[int]) -> list[int]:
  """A cycle in which source d appears weights[d] times, spread evenly."""
  return [d for _, d in sorted(((j + 0.5) / w, d) for d, w in enumerate(weights)
                               for j in range(w))]


class TokenMix:
  """Random access to chains' examples from one or several token-grid sources, by global
  position (read it with `HostBatchIterator(..., shuffle=False)`; it shuffles by itself).

  Position p is row p % B of global batch g = p // B. Batch g comes from source cycle[g % len]
  (`weights` batches of each source per cycle, default one each) and uses one patch grid,
  drawn from (seed, g) among `grids[source]`; its examples are cut to that window at a random
  offset from (seed, p), and carry `kind` (the source's index) and `grid`. Each source is read
  in epochs of its own (a new permutation each epoch when `shuffle`), so a small source
  repeats sooner than a big one.

  Args:
    sources: random-access examples {tokens [F, R, C], text, text_mask}.
    names: a name per source (for logs and per-kind scores).
    grids: per source, the (frames, rows, cols) patch grids that fit all its examples.
    patch: (patch_rows, patch_cols) in tokens.
    global_batch: chains per global batch.
  """

  shuffles_itself = True

  def __init__(self, sources: Sequence[Any], names: Sequence[str],
               grids: Sequence[Sequence[Sequence[int]]], patch: Sequence[int],
               global_batch: int, seed: int, weights: Sequence[int] | None = None,
               shuffle: bool = True):
    weights = list(weights or [1] * len(sources))
    if len(weights) != len(sources) or min(weights) < 1:
      raise ValueError(f"config.data.weights={weights}: expected one positive integer per "
                       f"dataset ({len(sources)}).")
    for name, source in zip(names, sources):
      if not len(source):
        raise ValueError(f"token dataset {name} is empty.")
    self.sources, self.names = list(sources), list(names)
    self.grids = [[tuple(g) for g in gs] for gs in grids]
    self.patch, self.global_batch, self.seed, self.shuffle = tuple(patch), global_batch, seed, \
        shuffle
    self.weights, self.cycle = weights, interleave(weights)
    self._perms: dict[tuple[int, int], np.ndarray] = {}
    seen = [0] * len(sources)
    self._before = []  # batches of cycle[i]'s source before place i of the cycle
    for d in self.cycle:
      self._before.append(seen[d])
      seen[d] += 1

  def __len__(self):
    # Effectively endless; a multiple of the batch cycle so that wrapping keeps batches whole.
    period = self.global_batch * len(self.cycle)
    return period * (2 ** 40 // period)

  def source_of(self, batch: int) -> int:
    return self.cycle[batch % len(self.cycle)]

  def grid(self, batch: int) -> tuple[int, int, int]:
    """The patch grid of global batch `batch`."""
    options = self.grids[self.source_of(batch)]
    return options[int(np.random.default_rng([self.seed, 5, batch]).integers(len(options)))]

  def _permutation(self, d: int, epoch: int) -> np.ndarray:
    perm = self._perms.get((d, epoch))
    if perm is None:  # reader threads may compute one twice; the result is the same
      if len(self._perms) >= 4 * len(self.sources):
        self._perms.clear()
      perm = np.random.default_rng([self.seed, 7, d, epoch]).permutation(len(self.sources[d]))
      self._perms[(d, epoch)] = perm
    return perm

  def index(self, position: int) -> tuple[int, int]:
    """(source, example index) of a global position."""
    batch, row = divmod(int(position), self.global_batch)
    place = batch % len(self.cycle)
    d = self.cycle[place]
    k = ((batch // len(self.cycle)) * self.weights[d] + self._before[place]) * \
        self.global_batch + row
    epoch, i = divmod(k, len(self.sources[d]))
    return d, int(self._permutation(d, epoch)[i]) if self.shuffle else i

  def __getitem__(self, position: int) -> dict[str, np.ndarray]:
    d, i = self.index(position)
    ex = dict(self.sources[d][i])
    grid = self.grid(int(position) // self.global_batch)
    window = (grid[0], grid[1] * self.patch[0], grid[2] * self.patch[1])
    rng = np.random.default_rng([self.seed, 4, int(position)])
    ex["tokens"] = crop_window(np.asarray(ex["tokens"]), window, rng)
    ex["kind"] = np.int32(d)
    ex["grid"] = np.asarray(grid, np.int32)
    return ex


def unigram_cross_entropy(train, test, vocab: int, examples: int = 256) -> float:
  """Held-out nll of the context-free baseline: token frequencies of (up to `examples`)
  examples of `train` (add-one smoothed), scored on (up to `examples`) examples of `test`."""
  counts = np.ones(vocab)
  for i in range(min(examples, len(train))):
    counts += np.bincount(np.asarray(train[i]["tokens"]).reshape(-1), minlength=vocab)[:vocab]
  log_p = np.log(counts / counts.sum())
  total, n = 0.0, 0
  for i in range(min(examples, len(test))):
    tokens = np.asarray(test[i]["tokens"]).reshape(-1)
    total, n = total - log_p[tokens].sum(), n + tokens.size
  return total / max(n, 1)


def patches_in_order(tokens: np.ndarray, order: Sequence[Sequence[int]], patch_rows: int,
                     patch_cols: int) -> np.ndarray:
  """[F, R, C] tokens → [N, P] patch tokens (raster inside a patch) in `order`."""
  return np.stack([tokens[t, r * patch_rows:(r + 1) * patch_rows,
                          c * patch_cols:(c + 1) * patch_cols].reshape(-1)
                   for t, r, c in order])


class ChainBatch:
  """One batch of chains of equal length, as per-step numpy arrays [N, B, ...].

  Attributes:
    tokens [N, B, P]; context_slot, context_offset, context_valid [N, B, M] (the compact
    context, see context_pool.Schedule.compact: M = max_context, or K offsets when it is
    None); write_slot [N, B]; text [B, L], text_mask [B, L], orders [B, N, 3], grid (frames,
    rows, cols) in patches, peak_occupancy (max over the batch).
  """

  def __init__(self, examples: Sequence[Mapping[str, Any]], grid: Sequence[int],
               patch: tuple[int, int], extent, pool_slots: int,
               rngs: Sequence[np.random.Generator], order: str = "random",
               max_context: int | None = None):
    """Args: one rng per example (from its place in the global order, so that a chain does
    not depend on how many hosts share the batch); order: 'random', a raster direction, or
    'around' (outward rings from the central patch);
    max_context: context entries per step (None: one per offset, K)."""
    frames, rows, cols = grid
    window = (frames, rows * patch[0], cols * patch[1])
    tokens, orders, schedules = [], [], []
    for ex, rng in zip(examples, rngs):
      grid_tokens = crop_window(np.asarray(ex["tokens"]), window, rng)
      if order == "random":
        chain_order = orders_lib.sample_order(rng, grid)
      elif order == "around":  # outward rings around the central patch
        r0, c0 = grid[1] // 2, grid[2] // 2
        chain_order = orders_lib.rings(grid, (r0, c0, r0 + 1, c0 + 1))
      else:
        chain_order = orders_lib.raster(grid, order)
      orders.append(chain_order)
      schedules.append(context_pool.make_schedule(chain_order, extent, pool_slots))
      tokens.append(patches_in_order(grid_tokens, chain_order, *patch))
    stacked = context_pool.stack_schedules(schedules, max_context)
    self.tokens = np.stack(tokens, 1).astype(np.int32)
    self.context_slot = stacked["context_slot"]
    self.context_offset = stacked["context_offset"]
    self.context_valid = stacked["context_valid"]
    self.write_slot = stacked["write_slot"]
    self.text = np.stack([np.asarray(ex["text"]) for ex in examples]).astype(np.int32)
    self.text_mask = np.stack([np.asarray(ex["text_mask"]) for ex in examples]).astype(bool)
    self.orders = np.asarray(orders, np.int32)
    self.grid = tuple(grid)
    self.kind: int | None = None  # index of the source dataset (TokenMix), set by the trainer
    self.peak_occupancy = max(s.peak_occupancy for s in schedules)

  @property
  def num_steps(self) -> int:
    return self.tokens.shape[0]

  def step(self, i: int) -> dict[str, np.ndarray]:
    """Inputs of patch step i for the whole batch."""
    return {"tokens": self.tokens[i], "context_slot": self.context_slot[i],
            "context_offset": self.context_offset[i], "context_valid": self.context_valid[i],
            "write_slot": self.write_slot[i],
            "text": self.text, "text_mask": self.text_mask}
