"""Pictures people look at: PNG grids, GIFs and contact sheets, written atomically."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def _atomic_save(image: Image.Image, path: str, **kwargs) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  image.save(tmp, format=kwargs.pop("format", None) or path.rsplit(".", 1)[-1].upper(), **kwargs)
  os.replace(tmp, path)
  return path


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] (or uint8) → uint8."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  """Tiles rows of images ([N, H, W, 3] each, same H, W) into one uint8 image."""
  rows = [to_uint8(r) for r in rows]
  n = max(len(r) for r in rows)
  h, w = rows[0].shape[1:3]
  out = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y:y + h, x:x + w] = image
  return out


def save_png(path: str, image: np.ndarray) -> str:
  return _atomic_save(Image.fromarray(to_uint8(image)), path, format="PNG")


def save_gif(path: str, frames: np.ndarray, fps: float = 4.0) -> str:
  """frames [T, H, W, 3] → an endlessly looping GIF."""
  pil = [Image.fromarray(f) for f in to_uint8(frames)]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  pil[0].save(tmp, format="GIF", save_all=True, append_images=pil[1:],
              duration=int(1000 / fps), loop=0)
  os.replace(tmp, path)
  return path


def contact_sheet(path: str, items: Sequence[tuple], width: int = 768,
                  max_upscale: int = 0) -> str:
  """A labelled column of pictures (each scaled to `width`, or enlarged at most
  `max_upscale` times when > 0), for a run's overview.

  items: (label, image) or (label, image, boxes), boxes = [(top, left, height, width)] in the
  image's pixels, outlined in red (the given part of an outpainting, the given first frame).
  """
  tiles = []
  for label, image, *rest in items:
    image = Image.fromarray(to_uint8(image))
    scale = width / image.width
    if max_upscale and scale > 1:
      scale = min(max_upscale, int(scale))
    image = image.resize((max(1, round(image.width * scale)),
                          max(1, round(image.height * scale))),
                         Image.NEAREST if scale >= 1 else Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for top, left, h, w in (rest[0] if rest else ()):
      draw.rectangle([round(left * scale), round(top * scale),
                      round((left + w) * scale) - 1, round((top + h) * scale) - 1],
                     outline=(255, 0, 0), width=2)
    tile = Image.new("RGB", (width, image.height + 18), "white")
    tile.paste(image, (0, 18))
    ImageDraw.Draw(tile).text((4, 3), label, fill="black")
    tiles.append(tile)
  sheet = Image.new("RGB", (width, sum(t.height for t in tiles)), "white")
  y = 0
  for tile in tiles:
    sheet.paste(tile, (0, y))
    y += tile.height
  return _atomic_save(sheet, path, format="PNG")


def save_mp4(path: str, frames: np.ndarray, fps: float = 4.0) -> str:
  """frames [T, H, W, 3] → H.264 MP4 (PyAV; sizes padded to even numbers), written atomically."""
  import av  # pylint: disable=g-import-not-at-top
  frames = to_uint8(frames)
  h, w = frames.shape[1:3]
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.mp4"
  with av.open(tmp, mode="w") as container:
    stream = container.add_stream("libx264", rate=int(round(fps)))
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    stream.options = {"crf": "18"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  os.replace(tmp, path)
  return path
