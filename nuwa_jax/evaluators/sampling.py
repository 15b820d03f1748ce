"""Samples for evaluation: a task at a size, per-sample keys, decoded to uint8 pixels.

`Samples(params, spec, ids, captions=, given=)` draws sample `i` with the key folded from
(seed, i) (`sampler.patch_keys`), so results do not depend on the batch size, on how many
samples are asked for, or on which host draws them (`share` splits ids over processes). Token
grids are decoded whole, in one call (no tiles, so no seams in what the metric sees).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import numpy as np

from nuwa_jax import generate as gen
from nuwa_jax import tiled_decode
from nuwa_jax.data.pretokenize import Encoder
from nuwa_jax.runtime import images as image_io
from nuwa_jax.sampler import PatchSampler, SamplingOptions

VIDEO_TASKS = ("animate", "text_to_video")
TEXT_TASKS = ("text_to_image", "text_to_video")


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """What to draw: a task at a size in pixels (0: the trained patch), with sampling options."""
  task: str = "unconditional"
  height: int = 0
  width: int = 0
  frames: int = 1
  direction: str = "right"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  guidance: float = 1.0
  seed: int = 0

  def options(self) -> SamplingOptions:
    return SamplingOptions(self.temperature, self.top_k, self.top_p, self.guidance)


def share(count: int) -> np.ndarray:
  """The sample indices of this process (every process draws a strided share)."""
  return np.arange(jax.process_index(), count, jax.process_count())


def gather_rows(rows: np.ndarray) -> np.ndarray:
  """Every process's `share` rows, back in global sample order (a no-op in one process)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top  # multi-host only
  count = int(np.sum(multihost_utils.process_allgather(np.array([len(rows)]))))
  width = -(-count // jax.process_count())
  padded = np.zeros((width,) + rows.shape[1:], rows.dtype)
  padded[:len(rows)] = rows
  parts = np.asarray(multihost_utils.process_allgather(padded))  # [P, width, ...]
  out = np.empty((count,) + rows.shape[1:], rows.dtype)
  for p in range(jax.process_count()):
    ids = np.arange(p, count, jax.process_count())
    out[ids] = parts[p, :len(ids)]
  return out


@dataclasses.dataclass
class Drawn:
  pixels: np.ndarray  # uint8 [N, H, W, 3] or [N, T, H, W, 3]
  given: np.ndarray | None  # bool [H, W]: pixels of the given part (outpainting), else None
  ids: np.ndarray


class Samples:
  """Draws evaluation samples from a NUWA-Infinity model (parameters given per call)."""

  def __init__(self, model, vq_model, vq_variables, captions=None, batch: int = 8):
    self.model, self.vq, self.variables, self.captions = model, vq_model, vq_variables, captions
    self.factor, self.batch = vq_model.factor, batch
    self.patch_px = (model.patch_rows * self.factor, model.patch_cols * self.factor)
    self._samplers: dict[SamplingOptions, PatchSampler] = {}
    vq, variables = vq_model, vq_variables
    self._decode = jax.jit(lambda t: tiled_decode.to_uint8(
        vq.apply(variables, t, method=vq.decode_indices)))
    self._encoder = Encoder(vq_model, vq_variables["params"], vq_variables.get("vq_stats"))
    self.out_dir: str | None = None  # where `save` writes (set per checkpoint by the caller)

  def size(self, spec: SampleSpec) -> tuple[int, int]:
    h = spec.height or self.patch_px[0]
    w = spec.width or self.patch_px[1]
    for name, v, unit in (("height", h, self.patch_px[0]), ("width", w, self.patch_px[1])):
      if v % unit:
        raise gen.RequestError(f"{name}={v} px is not a multiple of the patch ({unit} px).")
    return h, w

  def _sampler(self, params, options: SamplingOptions) -> PatchSampler:
    if options not in self._samplers:
      self._samplers[options] = PatchSampler(self.model, params, self.batch, options)
    return self._samplers[options].with_params(params)

  def __call__(self, params, spec: SampleSpec, ids: Sequence[int],
               captions: Sequence[str] | None = None,
               given: np.ndarray | None = None) -> Drawn:
    """Draws the samples `ids` (global indices); captions[k] / given[k] go with ids[k].

    given: uint8 pictures [N, h, w, 3] (outpaint, animate), sizes multiples of the patch.
    """
    ids = np.asarray(ids, np.int64)
    height, width = self.size(spec)
    if spec.task in TEXT_TASKS and captions is None:
      raise gen.RequestError(f"task {spec.task} needs captions")
    if captions is not None and self.captions is None:
      raise gen.RequestError("captions given but the model has no caption tokenizer")
    sampler = self._sampler(params, spec.options())
    video = spec.task in VIDEO_TASKS
    frames = spec.frames if video else 1
    out, mask = [], None
    for lo in range(0, len(ids), self.batch):
      chunk = ids[lo:lo + self.batch]
      n = len(chunk)
      def pad(a, n=n):  # repeat the last row up to the compiled batch
        return np.concatenate([a, np.repeat(a[-1:], self.batch - n, 0)]) if n < self.batch else a
      chunk_ids = pad(chunk)
      text = text_mask = given_tokens = None
      if captions is not None:
        text, text_mask = self.captions.encode(
            [captions[k] for k in range(lo, lo + n)] + [captions[lo + n - 1]] * (self.batch - n),
            self.model.text_len)
      if given is not None:
        given_tokens = self._encoder(pad(np.asarray(given[lo:lo + n])))
      canvas = gen.make_canvas(spec.task, (self.model.patch_rows, self.model.patch_cols),
                               self.batch, height // self.factor, width // self.factor, frames,
                               given_tokens, spec.direction, text, text_mask)
      tokens = gen.generate(sampler, canvas, spec.seed, progress=False, sample_ids=chunk_ids)
      b, t, hq, wq = tokens.shape
      pixels = np.asarray(self._decode(tokens.reshape(b * t, hq, wq)))
      pixels = pixels.reshape(b, t, *pixels.shape[1:])[:n]
      out.append(pixels if video else pixels[:, 0])
      if given is not None and not video:
        mask = np.repeat(np.repeat(canvas.given[0], self.patch_px[0], 0), self.patch_px[1], 1)
    return Drawn(np.concatenate(out), mask, ids)

  def save(self, name: str, drawn: Drawn, count: int) -> list[str]:
    """Writes the first `count` samples as uint8 PNGs (exactly the pixels the metric saw)."""
    if not self.out_dir or not count or jax.process_index() != 0:
      return []
    folder = os.path.join(self.out_dir, name)
    paths = []
    for k, sample_id in enumerate(drawn.ids[:count]):
      px = drawn.pixels[k]
      px = np.concatenate(list(px), axis=1) if px.ndim == 4 else px
      paths.append(image_io.save_png(os.path.join(folder, f"{int(sample_id):05d}.png"), px))
    return paths


def from_config(config, batch: int = 8, tokenizer: str = "", spm: str = "") -> Samples:
  """Samples for a NUWA config whose data names its tokenizer and caption model."""
  # Function-local: the loader lives with the sample command for now (a later layout moves it
  # below the evaluators).
  from nuwa_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  parts = sample_lib.load_parts(config, tokenizer, spm)
  return Samples(parts.model, parts.vq_model, parts.vq_variables, parts.captions, batch)
