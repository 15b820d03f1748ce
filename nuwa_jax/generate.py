"""Canvases for the five tasks, generated patch by patch with streaming output and resume.

A `Canvas` is a token grid [batch, frames, Hq, Wq] cut into patches, an order over them
(orders.py), the patches that are given (teacher-forced, never sampled) and an optional
caption. `generate` walks the order: given patches only enter the pool, the others are
sampled (sampler.py); the pool schedule (context_pool.py) decides which slots hold which
patches, so memory stays at `pool_slots` patches however large the canvas grows.

Tasks (`make_canvas`):
  unconditional   (1, rows, cols) patches, grown column by column to the right (a panorama
                  of any width: the pool holds about (e_w + 1) columns).
  text_to_image   the same with a caption.
  outpaint        a given token grid placed at one side (right: given on the left, grown
                  rightwards; left, down, up likewise) or in the centre ('around': outward
                  rings), optionally with a caption.
  animate         a given token grid is frame 0 of `frames` frames, frame after frame.
  text_to_video   `frames` frames from a caption, frame after frame.

Streaming and resume (`out_dir`): every time a unit completes — a column of patches for
column-wise orders, a frame for videos, the whole canvas otherwise — the token grid and the
number of finished patches are written to `state.npz` (temp file + rename) and `on_unit` is
called, which decodes what is finished (see `nuwa_jax/sample.py`). A rerun with the same
request replays the finished patches through the pool (no sampling: they are given) and
continues; with the per-patch keys of `sampler.patch_key` it produces the same canvas as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Sequence

import numpy as np
from absl import logging

from nuwa_jax import context_pool
from nuwa_jax import orders as orders_lib
from nuwa_jax.sampler import PatchSampler, patch_keys

TASKS = ("unconditional", "outpaint", "text_to_image", "animate", "text_to_video")
OUTPAINT_DIRECTIONS = ("right", "left", "down", "up", "around")


class RequestError(ValueError):
  """A generation request that cannot be served (reported before any compute)."""


@dataclasses.dataclass
class Canvas:
  """tokens int32 [B, frames, Hq, Wq] (given patches filled in); given bool [frames, rows,
  cols] patches; order [(t, r, c)]; unit: 'columns' | 'frames' | 'canvas'."""
  task: str
  tokens: np.ndarray
  given: np.ndarray
  order: list
  patch: tuple[int, int]
  unit: str
  text: np.ndarray | None = None
  text_mask: np.ndarray | None = None

  @property
  def grid(self) -> tuple[int, int, int]:
    return tuple(self.given.shape)

  @property
  def batch(self) -> int:
    return self.tokens.shape[0]

  def given_box(self, factor: int) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) in pixels of the given patches of frame 0, or None."""
    rows, cols = np.nonzero(self.given[0])
    if not len(rows):
      return None
    ph, pw = self.patch[0] * factor, self.patch[1] * factor
    return (int(rows.min()) * ph, int(cols.min()) * pw, (int(rows.max()) - int(rows.min()) + 1)
            * ph, (int(cols.max()) - int(cols.min()) + 1) * pw)

  def unit_of(self, coord) -> int:
    t, _, c = coord
    return {"columns": c, "frames": t, "canvas": 0}[self.unit]


def _check_multiple(name: str, value: int, patch: int) -> int:
  if value <= 0 or value % patch:
    raise RequestError(f"{name}={value} tokens is not a positive multiple of the patch size "
                       f"{patch} tokens.")
  return value // patch


def make_canvas(task: str, patch: Sequence[int], batch: int, height: int, width: int,
                frames: int = 1, given: np.ndarray | None = None, direction: str = "right",
                text: np.ndarray | None = None, text_mask: np.ndarray | None = None) -> Canvas:
  """The canvas of a task, in tokens.

  Args:
    task: one of TASKS.
    patch: (patch_rows, patch_cols) tokens.
    height, width: canvas size in tokens (multiples of the patch).
    frames: video frames (animate, text_to_video).
    given: int token grid [h, w] (outpaint, animate), a multiple of the patch, or [B, h, w]
      (one picture per row, as evaluations of many held-out pictures use).
    direction: outpaint direction, one of OUTPAINT_DIRECTIONS.
    text, text_mask: caption ids [B, L] and mask (text tasks; optional for outpaint).
  Raises:
    RequestError: sizes not multiples of the patch, a missing or misplaced given grid, a
      missing caption, a bad direction or frame count.
  """
  if task not in TASKS:
    raise RequestError(f"task={task!r}: expected one of {TASKS}.")
  pr, pc = (int(p) for p in patch)
  rows, cols = _check_multiple("height", height, pr), _check_multiple("width", width, pc)
  needs_given = task in ("outpaint", "animate")
  if needs_given and given is None:
    raise RequestError(f"task={task} needs a given picture (--image).")
  if not needs_given and given is not None:
    raise RequestError(f"task={task} does not take a given picture.")
  if task in ("text_to_image", "text_to_video") and text is None:
    raise RequestError(f"task={task} needs a caption (--text).")
  if task == "unconditional" and text is not None:
    raise RequestError("task=unconditional takes no caption; use text_to_image.")
  video = task in ("animate", "text_to_video")
  if video and frames < 2:
    raise RequestError(f"task={task}: frames={frames}, expected at least 2.")
  if not video and frames != 1:
    raise RequestError(f"task={task} makes images: frames must be 1, got {frames}.")

  tokens = np.zeros((batch, frames, height, width), np.int32)
  given_patches = np.zeros((frames, rows, cols), bool)
  order_direction = "right" if cols >= rows else "down"
  if given is not None:
    given = np.asarray(given)
    if given.ndim == 3 and given.shape[0] != batch or given.ndim not in (2, 3):
      raise RequestError(f"the given picture must be a token grid [h, w] or [batch={batch}, h, "
                         f"w], got shape {given.shape}.")
    gr = _check_multiple("given picture height", given.shape[-2], pr)
    gc = _check_multiple("given picture width", given.shape[-1], pc)
    if task == "animate":
      if (gr, gc) != (rows, cols):
        raise RequestError(f"animate: the picture is {given.shape[-2:]} tokens but the video "
                           f"frames are {(height, width)}; they must be equal.")
      r0, c0 = 0, 0
    else:
      if direction not in OUTPAINT_DIRECTIONS:
        raise RequestError(f"direction={direction!r}: expected one of {OUTPAINT_DIRECTIONS}.")
      if direction in ("right", "left") and gr != rows:
        raise RequestError(f"outpaint {direction}: canvas height {height} must equal the "
                           f"picture's {given.shape[-2]} tokens.")
      if direction in ("down", "up") and gc != cols:
        raise RequestError(f"outpaint {direction}: canvas width {width} must equal the "
                           f"picture's {given.shape[-1]} tokens.")
      if gr > rows or gc > cols or (gr, gc) == (rows, cols):
        raise RequestError(f"outpaint: the canvas {(height, width)} must be larger than the "
                           f"picture {given.shape[-2:]} tokens.")
      r0 = {"down": 0, "up": rows - gr}.get(direction, (rows - gr) // 2)
      c0 = {"right": 0, "left": cols - gc}.get(direction, (cols - gc) // 2)
      order_direction = direction
    tokens[:, 0, r0 * pr:(r0 + gr) * pr, c0 * pc:(c0 + gc) * pc] = given  # [h, w] or [B, h, w]
    given_patches[0, r0:r0 + gr, c0:c0 + gc] = True

  if task == "outpaint" and direction == "around":
    order = orders_lib.rings((frames, rows, cols), (r0, c0, r0 + gr, c0 + gc))
    unit = "canvas"
  else:
    order = orders_lib.raster((frames, rows, cols), order_direction)
    unit = "frames" if video else "columns" if order_direction in ("right", "left") else "canvas"
  if text is not None:
    text = np.broadcast_to(np.asarray(text, np.int32), (batch,) + np.shape(text)[-1:]).copy()
    text_mask = (np.ones_like(text, bool) if text_mask is None else
                 np.broadcast_to(np.asarray(text_mask, bool), text.shape).copy())
  return Canvas(task, tokens, given_patches, order, (pr, pc), unit, text, text_mask)


# ----------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------

def _signature(canvas: Canvas, seed: int, options, sample_ids: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([canvas.task, canvas.grid, canvas.patch, canvas.batch, seed,
                       dataclasses.asdict(options)], default=str).encode())
  if not np.array_equal(sample_ids, np.arange(canvas.batch)):
    h.update(np.asarray(sample_ids, np.int64).tobytes())
  h.update(np.ascontiguousarray(canvas.given).tobytes())
  h.update(np.ascontiguousarray(canvas.tokens).tobytes())
  if canvas.text is not None:
    h.update(canvas.text.tobytes() + canvas.text_mask.tobytes())
  return h.hexdigest()[:16]


def _save_state(path: str, tokens: np.ndarray, done: int, signature: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, tokens=tokens, done=done, signature=signature)
  os.replace(tmp, path)


class Progress:
  """Step lines with patches/s and ETA, at most every `every` seconds (and at the end)."""

  def __init__(self, total: int, label: str, every: float = 2.0, start: int = 0):
    self.total, self.label, self.every, self.start = total, label, every, start
    self.t0 = self.last = time.time()

  def update(self, done: int) -> None:
    now = time.time()
    if now - self.last < self.every and done < self.total:
      return
    self.last = now
    rate = (done - self.start) / max(now - self.t0, 1e-9)
    eta = (self.total - done) / rate if rate else float("inf")
    logging.info("%s: patch %d/%d  %.2f patches/s  ETA %dm%02ds", self.label, done, self.total,
                 rate, *divmod(int(eta), 60) if eta != float("inf") else (0, 0))


def generate(sampler: PatchSampler, canvas: Canvas, seed: int = 0, out_dir: str | None = None,
             on_unit: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
             stop_after: int | None = None, progress: bool = True,
             sample_ids: Sequence[int] | None = None) -> np.ndarray:
  """Fills the canvas; returns tokens [B, frames, Hq, Wq].

  Args:
    sampler: compiled for this model and `canvas.batch`.
    seed: row b, patch i of the order uses `patch_keys(seed, i, sample_ids)[b]`.
    out_dir: where `state.npz` is kept (resume); None: no state.
    on_unit: called as on_unit(unit, tokens, finished_patches_mask [frames, rows, cols]) each
      time a unit completes (streaming decode), in generation order.
    stop_after: stop (as if interrupted) after this many patches of the order.
    sample_ids: the global index of each row (default 0..B-1): a sample's tokens depend on
      (seed, its index) only, whatever the batch it is drawn in.
  """
  model = sampler.model
  sample_ids = np.arange(canvas.batch) if sample_ids is None else np.asarray(sample_ids)
  if sample_ids.shape != (canvas.batch,):
    raise RequestError(f"sample_ids has shape {sample_ids.shape}, expected ({canvas.batch},).")
  if canvas.batch != sampler.batch:
    raise RequestError(f"the canvas has batch {canvas.batch}, the sampler {sampler.batch}.")
  if canvas.patch != (model.patch_rows, model.patch_cols):
    raise RequestError(f"canvas patch {canvas.patch} != model patch "
                       f"{(model.patch_rows, model.patch_cols)}.")
  if canvas.text is not None and not model.text_len:
    raise RequestError("a caption was given but the model has no text encoder (text_len 0).")
  schedule = context_pool.make_schedule(canvas.order, model.extent, model.pool_slots)
  tokens = canvas.tokens.copy()
  text, text_mask = canvas.text, canvas.text_mask
  if text is not None:
    if text.shape[1] != model.text_len:
      raise RequestError(f"caption has {text.shape[1]} ids, the model takes {model.text_len}.")

  signature = _signature(canvas, seed, sampler.options, sample_ids)
  state_path = os.path.join(out_dir, "state.npz") if out_dir else None
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  done = 0
  if state_path and os.path.exists(state_path):
    with np.load(state_path) as saved:
      if str(saved["signature"]) != signature:
        raise RequestError(f"{state_path} belongs to another request (task, size, seed, "
                           "options, picture or caption differ); use another --out or delete it.")
      tokens, done = saved["tokens"], int(saved["done"])
    logging.info("resuming: %d of %d patches already generated", done, schedule.num_steps)

  pr, pc = canvas.patch
  if done == schedule.num_steps:  # finished before: only (re)write what is missing
    finished = np.ones(canvas.grid, bool)
    for unit in sorted({canvas.unit_of(c) for c in canvas.order}, key=[
        canvas.unit_of(c) for c in canvas.order].index):
      if on_unit is not None:
        on_unit(unit, tokens, finished)
    return tokens
  unit_size: dict[int, int] = {}
  for coord in canvas.order:
    unit_size[canvas.unit_of(coord)] = unit_size.get(canvas.unit_of(coord), 0) + 1
  unit_done: dict[int, int] = {}
  finished = np.zeros(canvas.grid, bool)
  pool = sampler.new_pool()
  bar = Progress(schedule.num_steps, canvas.task, start=done) if progress else None
  last = schedule.num_steps if stop_after is None else min(stop_after, schedule.num_steps)
  context = schedule.compact(sampler.entries)
  for i in range(last):
    t, r, c = (int(x) for x in canvas.order[i])
    fields = {name: np.broadcast_to(context["context_" + name][i], (canvas.batch, sampler.entries))
              for name in ("slot", "valid", "offset")}
    fields.update(text=text, text_mask=text_mask)
    fields = {k: (np.ascontiguousarray(v) if v is not None else None) for k, v in fields.items()}
    window = (slice(None), t, slice(r * pr, (r + 1) * pr), slice(c * pc, (c + 1) * pc))
    if i < done or canvas.given[t, r, c]:
      patch_tokens = tokens[window].reshape(canvas.batch, pr * pc)
    else:
      patch_tokens = sampler.sample(pool, fields, patch_keys(seed, i, sample_ids))
      tokens[window] = patch_tokens.reshape(canvas.batch, pr, pc)
    pool = sampler.commit(pool, fields, patch_tokens,
                          np.full((canvas.batch,), schedule.write_slot[i], np.int32))
    finished[t, r, c] = True
    unit = canvas.unit_of((t, r, c))
    unit_done[unit] = unit_done.get(unit, 0) + 1
    if unit_done[unit] == unit_size[unit]:
      if state_path and i + 1 > done:
        _save_state(state_path, tokens, i + 1, signature)
      if on_unit is not None:
        on_unit(unit, tokens, finished)
    if bar and i >= done:
      bar.update(i + 1)
  return tokens

