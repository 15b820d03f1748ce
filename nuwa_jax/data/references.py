"""Held-out real pictures, clips and captions: the reference side of FID, Block-FID and FVD.

A reference is a built tfds dataset split, read back from its folder with
`tfds.builder_from_directory` (no builder class or build parameters needed). A token dataset
(nuwa_jax.data.pretokenize) names its source dataset in tokens.json, so an evaluation of a
model trained on token folders finds the pixels its tokens came from. Pictures are resized
(PIL bicubic, the smaller scale that covers the target) and centre-cropped to the size asked.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nuwa_jax.data import datasets
from nuwa_jax.data import pretokenize


class ReferenceError(ValueError):
  """A reference dataset that cannot be found or read."""


def fit(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3] scaled to cover (height, width) and centre-cropped to it."""
  image = Image.fromarray(np.asarray(pixels, np.uint8)).convert("RGB")
  scale = max(height / image.height, width / image.width)
  w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
  if (w, h) != image.size:
    image = image.resize((w, h), Image.BICUBIC)
  left, top = (w - width) // 2, (h - height) // 2
  return np.asarray(image.crop((left, top, left + width, top + height)))


def source_dir(token_folder: str, data_dir: str) -> str:
  """The tfds folder of the dataset a token folder was made from."""
  meta = pretokenize.read_meta(token_folder)
  if meta.get("source_dir") and os.path.isdir(meta["source_dir"]):
    return meta["source_dir"]
  path = os.path.join(data_dir or datasets.default_data_dir(), meta.get("source", ""))
  if not meta.get("source") or not os.path.isdir(path):
    raise ReferenceError(f"{token_folder}: its source dataset {meta.get('source')!r} is not in "
                         f"data_dir={data_dir or datasets.default_data_dir()} (build it there, "
                         "or give the dataset folder itself).")
  return path


class HeldOut:
  """Examples of one split of a built dataset, by index, cycled when more are asked for."""

  def __init__(self, folder: str, split: str = "test"):
    try:
      builder = tfds.builder_from_directory(folder)
    except Exception as e:  # tfds raises several kinds for a folder that is not a dataset
      raise ReferenceError(f"{folder}: not a built tfds dataset folder ({e})") from None
    if split not in builder.info.splits:
      raise ReferenceError(f"{folder}: no split {split!r} (has {sorted(builder.info.splits)})")
    self.folder, self.split = folder, split
    self.name = builder.info.full_name
    self.source = builder.as_data_source(split)
    if not len(self.source):
      raise ReferenceError(f"{folder}: split {split!r} is empty")
    self.is_video = "clip" in builder.info.features

  def __len__(self) -> int:
    return len(self.source)

  def _indices(self, count: int, start: int = 0) -> Sequence[int]:
    return [i % len(self.source) for i in range(start, start + count)]

  def images(self, count: int, height: int, width: int, start: int = 0) -> np.ndarray:
    """uint8 [count, height, width, 3] of examples start.. (the first frame of clips)."""
    out = []
    for i in self._indices(count, start):
      ex = self.source[i]
      frame = ex["clip"][0] if self.is_video else ex["image"]
      out.append(fit(np.asarray(frame), height, width))
    return np.stack(out)

  def clips(self, count: int, frames: int, height: int, width: int, start: int = 0
            ) -> np.ndarray:
    """uint8 [count, frames, height, width, 3] of examples start..; clips of other lengths
    are cut or looped."""
    if not self.is_video:
      raise ReferenceError(f"{self.folder} holds images, not clips")
    out = []
    for i in self._indices(count, start):
      clip = self.source[i]["clip"]
      out.append(np.stack([fit(np.asarray(clip[t % len(clip)]), height, width)
                           for t in range(frames)]))
    return np.stack(out)

  def captions(self, count: int) -> list[str]:
    out = []
    for i in self._indices(count):
      c = self.source[i].get("caption", b"")
      out.append(c.decode("utf-8") if isinstance(c, bytes) else str(c))
    if not any(out):
      raise ReferenceError(f"{self.folder}: split {self.split!r} has no captions")
    return out
