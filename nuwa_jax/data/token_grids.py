"""Token-grid examples for the NUWA-Infinity transformer, and how chains are cut from them.

A token-grid example is {"tokens": int32 [frames, rows, cols] (images: frames = 1),
"text": int32 [text_len], "text_mask": bool [text_len]}. Training cuts a window of
(gt, gh, gw) patches from it (aligned to the token grid at a random offset), picks an order per
example, and feeds the chain patch by patch.

`SyntheticTokenGrids` is a generated stand-in with known structure, used by tests and when no
pre-tokenised dataset is given: a background of two token bands with noise, a few rectangles
of "colour" tokens, and optionally a right half that repeats the left half (so that context
from the pool is what predicts it).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

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
    not depend on how many hosts share the batch); order: 'random' or a raster direction;
    max_context: context entries per step (None: one per offset, K)."""
    frames, rows, cols = grid
    window = (frames, rows * patch[0], cols * patch[1])
    tokens, orders, schedules = [], [], []
    for ex, rng in zip(examples, rngs):
      grid_tokens = crop_window(np.asarray(ex["tokens"]), window, rng)
      if order == "random":
        chain_order = orders_lib.sample_order(rng, grid)
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
