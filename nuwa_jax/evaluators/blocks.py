"""Block-FID tiling: cut images (or video frames) into the fixed-size tiles FID is taken over.

Tiles are non-overlapping, on a grid anchored at the top-left corner; partial tiles at the
right and bottom edges are dropped. With region="generated" a tile that lies wholly inside
the given (conditioning) part of the canvas is left out, so an outpainting or inpainting
score is not inflated by copied pixels; tiles partly given are kept. `BlockSpec` records
every one of these settings so an evaluator can write them beside the value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

REGIONS = ("generated", "all")


def _check(block: tuple[int, int] | int, region: str) -> tuple[int, int]:
  """(bh, bw) from a (height, width) pair or one int for square tiles; validates region."""
  bh, bw = (block, block) if isinstance(block, (int, np.integer)) else block
  bh, bw = int(bh), int(bw)
  if bh <= 0 or bw <= 0:
    raise ValueError(f"block={block!r}: expected positive (height, width).")
  if region not in REGIONS:
    raise ValueError(f"region={region!r}: expected one of {REGIONS}.")
  return bh, bw


def _given_mask(given: Any, height: int, width: int) -> np.ndarray:
  mask = np.asarray(given)
  if mask.shape != (height, width):
    raise ValueError(f"given: expected a mask [{height}, {width}], got shape {mask.shape}.")
  return mask.astype(bool)


def _keep_mask(height: int, width: int, block: tuple[int, int], given: Any,
               region: str) -> np.ndarray:
  """[rows, cols] bool: which whole tiles of the grid are kept."""
  bh, bw = _check(block, region)
  rows, cols = height // bh, width // bw
  if given is None or region == "all":
    if given is not None:
      _given_mask(given, height, width)  # still validated: a wrong mask is a caller's bug
    return np.ones((rows, cols), bool)
  mask = _given_mask(given, height, width)[:rows * bh, :cols * bw]
  wholly_given = mask.reshape(rows, bh, cols, bw).all(axis=(1, 3))
  return ~wholly_given


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Every setting of a Block-FID tiling.

  Attributes:
    block: (height, width) of a tile in pixels.
    region: "generated" (tiles wholly inside the given part left out) or "all".
    anchor: where the grid starts; always "top-left".
    stride: step between tiles; always equal to `block` (no overlap).
    partial_tiles: what happens to tiles cut by the right/bottom edges; always "dropped".
  """
  block: tuple[int, int]
  region: str = "generated"
  anchor: str = "top-left"
  stride: tuple[int, int] | None = None
  partial_tiles: str = "dropped"

  def __post_init__(self):
    block = _check(self.block, self.region)
    object.__setattr__(self, "block", block)
    if self.stride is None:
      object.__setattr__(self, "stride", block)
    if (self.anchor, tuple(self.stride), self.partial_tiles) != ("top-left", block,
                                                                 "dropped"):
      raise ValueError("Only a top-left anchored grid with stride = block and partial "
                       f"tiles dropped is implemented, got {self}.")

  def as_dict(self) -> dict[str, Any]:
    """The settings as a flat dict of plain values, to log or save beside the metric."""
    return {"block_height": self.block[0], "block_width": self.block[1],
            "region": self.region, "anchor": self.anchor,
            "stride_height": self.stride[0], "stride_width": self.stride[1],
            "partial_tiles": self.partial_tiles}

  def tile(self, image: Any, given: Any = None) -> np.ndarray:
    """`tile_blocks` with these settings."""
    return tile_blocks(image, self.block, given, self.region)

  def tile_video(self, video: Any, given: Any = None) -> np.ndarray:
    """`tile_video_blocks` with these settings."""
    return tile_video_blocks(video, self.block, given, self.region)

  def count(self, height: int, width: int, given: Any = None) -> int:
    """`count_blocks` with these settings."""
    return count_blocks(height, width, self.block, given, self.region)


def block_positions(height: int, width: int, block: tuple[int, int], given: Any = None,
                    region: str = "generated") -> np.ndarray:
  """Top-left corners of the kept tiles, row-major (the order `tile_blocks` returns).

  Args:
    height, width: canvas size in pixels.
    block: (bh, bw) tile size.
    given: [height, width] bool mask, True where pixels were given (conditioning), or None
      when nothing was given.
    region: "generated" or "all".

  Returns:
    [n, 2] int array of (y, x).
  """
  bh, bw = _check(block, region)
  keep = _keep_mask(height, width, block, given, region)
  ys, xs = np.nonzero(keep)
  return np.stack([ys * bh, xs * bw], axis=1).astype(np.int64)


def count_blocks(height: int, width: int, block: tuple[int, int], given: Any = None,
                 region: str = "generated") -> int:
  """Number of tiles `tile_blocks` returns for a canvas of this size (arguments as there).

  Returns:
    int.
  """
  return int(_keep_mask(height, width, block, given, region).sum())


def tile_blocks(image: Any, block: tuple[int, int], given: Any = None,
                region: str = "generated") -> np.ndarray:
  """Cuts an image into non-overlapping tiles on a top-left anchored grid.

  Partial tiles at the right and bottom edges are dropped. With region="generated", a tile
  whose pixels are all given (mask True everywhere in it) is left out; tiles partly given
  are kept. region="all" keeps every whole tile. With given=None nothing counts as given.

  Args:
    image: [H, W, C] array (uint8 in the evaluators; the dtype is kept).
    block: (bh, bw) tile size.
    given: [H, W] bool mask of given pixels, or None.
    region: "generated" or "all".

  Returns:
    [n, bh, bw, C] tiles in row-major grid order.

  Raises:
    ValueError: an image that is not [H, W, C], a mask of another size, a bad block or region.
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"image: expected [H, W, C], got shape {image.shape}.")
  height, width, channels = image.shape
  bh, bw = _check(block, region)
  keep = _keep_mask(height, width, block, given, region)
  rows, cols = keep.shape
  grid = image[:rows * bh, :cols * bw].reshape(rows, bh, cols, bw, channels)
  tiles = grid.transpose(0, 2, 1, 3, 4).reshape(rows * cols, bh, bw, channels)
  return tiles[keep.reshape(-1)]


def tile_video_blocks(video: Any, block: tuple[int, int], given: Any = None,
                      region: str = "generated") -> np.ndarray:
  """`tile_blocks` of every frame of a video, frames in order.

  Args:
    video: [T, H, W, C].
    block: (bh, bw).
    given: None, one [H, W] mask for every frame, or [T, H, W] (e.g. given first frames).
    region: "generated" or "all".

  Returns:
    [n, bh, bw, C], the tiles of frame 0 first.
  """
  video = np.asarray(video)
  if video.ndim != 4:
    raise ValueError(f"video: expected [T, H, W, C], got shape {video.shape}.")
  frames, height, width = video.shape[:3]
  masks: list[Any]
  if given is None:
    masks = [None] * frames
  else:
    given = np.asarray(given)
    if given.shape == (height, width):
      masks = [given] * frames
    elif given.shape == (frames, height, width):
      masks = list(given)
    else:
      raise ValueError(f"given: expected [{height}, {width}] or [{frames}, {height}, "
                       f"{width}], got shape {given.shape}.")
  bh, bw = _check(block, region)
  tiles = [tile_blocks(frame, block, m, region) for frame, m in zip(video, masks)]
  if not tiles:
    return np.zeros((0, bh, bw, video.shape[-1]), video.dtype)
  return np.concatenate(tiles)
