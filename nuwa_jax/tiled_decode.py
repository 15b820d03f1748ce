"""Decoding token grids of any size in overlapping tiles, column by column, to memory or disk.

A canvas of Hq x Wq tokens (e.g. 64 x 4096 = 1024 x 65536 px at f=16) is cut into tiles of a
fixed shape (th, tw) that overlap their neighbours; every canvas token is *kept* from exactly
one tile, the one in whose centre it lies: the boundary between two neighbouring tiles is the
middle of their overlap, so each kept token is at least `overlap` tokens away from any tile
edge that is not a canvas edge. The last tile of a row or column is placed flush with the
canvas end instead of being padded, so only a canvas smaller than one tile is ever padded.

Exactness: a kept pixel equals whole-canvas decoding when the decoder's receptive field (in
tokens, `decoder_receptive_radius`) fits in the overlap. That holds for decoders without
attention and with per-pixel normalisation (`VQGAN(norm="pixel", mid_attention=False,
attn_resolutions=())`); taming's attention and GroupNorm statistics are global within a tile,
so there a tile sees other statistics than the whole canvas (`seam_error` measures it;
`python bench/bench_vqgan.py --seams` compares decoders: at random init most of the difference
comes from GroupNorm, not from attention).

Memory: one column of tiles is decoded at a time (in chunks of `max_batch` tiles) and handed
to `sink(x0, block)` as a finished pixel column block [Hq*f, w, C], left to right, covering
the canvas exactly once. `NpyColumnSink` writes the blocks into an .npy memmap on disk and
`write_png` streams such an array into a PNG row chunk by row chunk, so a 1024 x 65536 canvas
never has to be held in RAM (`decode_to_png` does both).

One jitted decode of one tile-batch shape serves every tile (edge chunks are padded by
repeating a tile), so the decoder is compiled once per call of `decode_tiled`.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Sink = Callable[[int, np.ndarray], None]


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of the tiles along one axis of n tokens (stride tile - 2*overlap)."""
  if n <= tile:
    return [0]
  stride = tile - 2 * overlap
  starts = list(range(0, n - tile, stride))
  return starts + [n - tile]


def kept_ranges(n: int, tile: int, starts: Sequence[int]) -> list[tuple[int, int]]:
  """[lo, hi) of the canvas kept from each tile: cut in the middle of each overlap."""
  cuts = [0] + [(b + a + tile) // 2 for a, b in itertools.pairwise(starts)] + [n]
  return list(itertools.pairwise(cuts))


def check_tiling(tile, overlap, factor) -> None:
  """Raises ValueError (message starting 'decode_tiled: ') for an unusable tile plan."""
  for name, pair in (("tile", tile), ("overlap", overlap)):
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
      raise ValueError(f"decode_tiled: {name} must be two integers (rows, cols), got {pair!r}.")
  if min(tile) < 1:
    raise ValueError(f"decode_tiled: tile={tuple(tile)} must be positive.")
  if min(overlap) < 0:
    raise ValueError(f"decode_tiled: overlap={tuple(overlap)} must be >= 0.")
  for t, o, axis in zip(tile, overlap, ("rows", "cols")):
    if t - 2 * o < 1:
      raise ValueError(f"decode_tiled: along {axis} tile {t} leaves no kept centre with "
                       f"overlap {o} (need tile - 2*overlap >= 1).")
  if not isinstance(factor, (int, np.integer)) or factor < 1:
    raise ValueError(f"decode_tiled: factor={factor!r} must be a positive integer.")


def _check(indices, tile, overlap, factor):
  if getattr(indices, "ndim", None) != 2:
    raise ValueError(f"decode_tiled: indices must be a 2-D token grid [Hq, Wq], got shape "
                     f"{getattr(indices, 'shape', None)}.")
  check_tiling(tile, overlap, factor)


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] float -> uint8 (round, clip)."""
  return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(
      jnp.uint8)


def decode_tiled(decode_fn: Callable[[jax.Array], jax.Array], indices: np.ndarray,
                 tile: Sequence[int], overlap: Sequence[int], factor: int,
                 sink: Sink | None = None, out_dtype: str = "uint8",
                 max_batch: int | None = None) -> np.ndarray | None:
  """Decodes a token grid in overlapping tiles, left to right, one tile column at a time.

  Args:
    decode_fn: int32 tokens [n, th, tw] -> images [n, th*f, tw*f, C] in [-1, 1]; jitted here
      (compiled once: every call has the same shape).
    indices: [Hq, Wq] integer tokens (numpy, a memmap is fine).
    tile: (th, tw) tokens per tile. overlap: (oh, ow) tokens of context kept on each side;
      tile - 2*overlap >= 1.
    factor: pixels per token (the VQGAN's f).
    sink: called as sink(x0, block) with each finished pixel column block [Hq*f, w, C] in
      order; None to return the whole image instead.
    out_dtype: 'uint8' (converted on device) or 'float32' (decoder output as is).
    max_batch: tiles per decode call (default: all tiles of one column).
  Returns:
    [Hq*f, Wq*f, C] array when sink is None, else None.
  Raises:
    ValueError: bad grid, tile, overlap or factor.
  """
  _check(indices, tuple(tile), tuple(overlap), factor)
  if out_dtype not in ("uint8", "float32"):
    raise ValueError(f"decode_tiled: out_dtype={out_dtype!r}, expected 'uint8' or 'float32'.")
  (hq, wq), (th, tw), f = indices.shape, tuple(tile), int(factor)
  rows, cols = tile_starts(hq, th, overlap[0]), tile_starts(wq, tw, overlap[1])
  row_keep, col_keep = kept_ranges(hq, th, rows), kept_ranges(wq, tw, cols)
  batch = min(max_batch or len(rows), len(rows))
  post = to_uint8 if out_dtype == "uint8" else (lambda x: x.astype(jnp.float32))
  run = jax.jit(lambda tokens: post(decode_fn(tokens)))
  out = None

  def cut(r0, c0):
    t = np.asarray(indices[r0:r0 + th, c0:c0 + tw], np.int32)
    if t.shape != (th, tw):  # canvas smaller than one tile: pad by repeating the edge
      t = np.pad(t, ((0, th - t.shape[0]), (0, tw - t.shape[1])), mode="edge")
    return t

  for c0, (x_lo, x_hi) in zip(cols, col_keep):
    pieces = []
    for k in range(0, len(rows), batch):
      chunk = [cut(r0, c0) for r0 in rows[k:k + batch]]
      n = len(chunk)
      chunk += [chunk[-1]] * (batch - n)  # one shape for every call
      pieces.extend(np.asarray(run(jnp.asarray(np.stack(chunk))))[:n])
    block = np.concatenate(
        [img[(y_lo - r0) * f:(y_hi - r0) * f, (x_lo - c0) * f:(x_hi - c0) * f]
         for img, r0, (y_lo, y_hi) in zip(pieces, rows, row_keep)], axis=0)
    if sink is not None:
      sink(x_lo * f, block)
      continue
    if out is None:
      out = np.empty((hq * f, wq * f, block.shape[-1]), block.dtype)
    out[:, x_lo * f:x_hi * f] = block
  return out


def decoder_receptive_radius(ch_mult: Sequence[int], num_res_blocks: int) -> int:
  """Tokens of context a taming decoder pixel depends on, ignoring attention and GroupNorm.

  Every 3x3 conv at a level with u pixels per token adds 1/u tokens: conv_in and the four
  middle convs at the latent resolution, 2 * (num_res_blocks + 1) convs per level, one conv
  after each upsampling, conv_out at full resolution.
  """
  levels = len(ch_mult)
  radius = 1 + 4  # conv_in, middle blocks
  for i in reversed(range(levels)):
    u = 2 ** (levels - 1 - i)
    radius += 2 * (num_res_blocks + 1) / u
    if i:
      radius += 1 / (2 * u)
  return math.ceil(radius + 1 / 2 ** (levels - 1))


def seam_error(tiled: np.ndarray, whole: np.ndarray, grid: Sequence[int],
               tile: Sequence[int], overlap: Sequence[int], factor: int,
               band: int | None = None) -> dict[str, float]:
  """Mean / max abs difference of tiled vs whole decoding, at tile borders and elsewhere.

  Args:
    tiled, whole: [H, W, C] float images. grid: (Hq, Wq). tile, overlap, factor: as used.
    band: pixels on each side of a kept-region boundary that count as border (default f).
  Returns:
    dict(mean_abs, max_abs, mean_abs_interior, mean_abs_border, border_share).
  """
  band = factor if band is None else band
  diff = np.abs(tiled.astype(np.float64) - whole.astype(np.float64)).mean(-1)
  border = np.zeros(diff.shape, bool)
  for axis, (n, t, o) in enumerate(zip(grid, tile, overlap)):
    for lo, _ in kept_ranges(n, t, tile_starts(n, t, o))[1:]:
      sl = [slice(None)] * 2
      sl[axis] = slice(max(lo * factor - band, 0), lo * factor + band)
      border[tuple(sl)] = True
  interior = diff[~border]
  return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()),
          "mean_abs_interior": float(interior.mean()) if interior.size else 0.0,
          "mean_abs_border": float(diff[border].mean()) if border.any() else 0.0,
          "border_share": float(border.mean())}


class NpyColumnSink:
  """A `sink` writing column blocks into an .npy file through np.memmap.

  The file is a normal .npy (np.load(path, mmap_mode="r") reads it); only the block being
  written has to be in memory. Blocks must arrive left to right without gaps.
  """

  def __init__(self, path: str, height: int, width: int, channels: int = 3,
               dtype: np.dtype = np.uint8):
    self.path = path
    self.array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype,
                                           shape=(height, width, channels))
    self.next_x = 0

  def __call__(self, x0: int, block: np.ndarray) -> None:
    if x0 != self.next_x:
      raise ValueError(f"NpyColumnSink: block at x={x0}, expected x={self.next_x}.")
    if block.shape[0] != self.array.shape[0] or x0 + block.shape[1] > self.array.shape[1]:
      raise ValueError(f"NpyColumnSink: block {block.shape} at x={x0} does not fit "
                       f"{self.array.shape}.")
    self.array[:, x0:x0 + block.shape[1]] = block
    self.next_x += block.shape[1]

  def close(self) -> np.ndarray:
    if self.next_x != self.array.shape[1]:
      raise ValueError(f"NpyColumnSink: only {self.next_x} of {self.array.shape[1]} columns "
                       "were written.")
    self.array.flush()
    return self.array


def _png_chunk(f, tag: bytes, data: bytes) -> None:
  f.write(struct.pack(">I", len(data)) + tag + data)
  f.write(struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def write_png(path: str, image: np.ndarray, rows_per_chunk: int = 64, level: int = 6) -> None:
  """Writes an 8-bit [H, W, 1|3|4] array (a memmap is fine) as PNG, a few rows at a time."""
  h, w, c = image.shape
  if image.dtype != np.uint8 or c not in (1, 3, 4):
    raise ValueError(f"write_png: expected uint8 [H, W, 1|3|4], got {image.dtype} {image.shape}.")
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
    _png_chunk(f, b"IHDR", struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0))
    comp = zlib.compressobj(level)
    for r0 in range(0, h, rows_per_chunk):
      rows = np.asarray(image[r0:r0 + rows_per_chunk]).reshape(-1, w * c)
      raw = np.concatenate([np.zeros((len(rows), 1), np.uint8), rows], axis=1)  # filter 0
      data = comp.compress(raw.tobytes())
      if data:
        _png_chunk(f, b"IDAT", data)
    _png_chunk(f, b"IDAT", comp.flush())
    _png_chunk(f, b"IEND", b"")


def decode_to_png(decode_fn: Callable[[jax.Array], jax.Array], indices: np.ndarray,
                  tile: Sequence[int], overlap: Sequence[int], factor: int, png_path: str,
                  npy_path: str | None = None, channels: int = 3,
                  max_batch: int | None = None) -> str:
  """Tiled decoding streamed to `npy_path` (default png_path + '.npy', kept) and a PNG."""
  npy_path = npy_path or png_path + ".npy"
  hq, wq = indices.shape
  sink = NpyColumnSink(npy_path, hq * factor, wq * factor, channels)
  decode_tiled(decode_fn, indices, tile, overlap, factor, sink=sink, max_batch=max_batch)
  write_png(png_path, sink.close())
  return os.path.abspath(png_path)
