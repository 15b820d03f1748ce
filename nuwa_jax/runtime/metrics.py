"""Metrics: TensorBoard event files and a JSON-lines file in the workdir, plus step logs.

Only process 0 writes; every process may call the methods. `AsyncMetrics` holds the device
arrays of step N and reads them to the host while step N+1 runs, so logging never stalls the
device; it is also where a non-finite loss stops the run, naming the step that produced it.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


class NonFiniteLossError(FloatingPointError):
  pass


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb/`."""

  def __init__(self, workdir: str, enabled: bool | None = None, jsonl: bool = True):
    """jsonl=False: TensorBoard only (for callers that write richer rows themselves)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if jsonl:
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30)
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events are written.")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    if self._jsonl:
      self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class AsyncMetrics:
  """Reads step N's metrics at step N+1; logs rate, tokens/s and ETA; stops on NaN/inf.

  Args:
    writer: where scalars go.
    total_steps: for the ETA.
    tokens_per_step: global tokens per step, for tokens/s.
    log_every: write and log every this many steps (the loss is checked every step).
  """

  def __init__(self, writer: MetricWriter, total_steps: int, tokens_per_step: int,
               log_every: int, first_step: int = 0):
    self.writer, self.total, self.tokens, self.every = writer, total_steps, tokens_per_step, log_every
    self._pending: tuple[int, Any] | None = None
    self._t0, self._s0 = time.perf_counter(), first_step
    self.history: list[dict[str, float]] = []

  def push(self, step: int, metrics: Any) -> None:
    """Registers the (still on-device) metrics of `step` and processes the previous ones."""
    previous, self._pending = self._pending, (step, metrics)
    if previous is not None:
      self._process(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      self._process(*self._pending)
      self._pending = None

  def _process(self, step: int, metrics: Any) -> None:
    values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
      raise NonFiniteLossError(f"non-finite loss {values['loss']} at step {step}.")
    if step % self.every and step != self.total:
      return
    now = time.perf_counter()
    rate = (step - self._s0) / max(now - self._t0, 1e-9)
    self._t0, self._s0 = now, step
    values.update(steps_per_sec=rate, tokens_per_sec=rate * self.tokens)
    self.history.append({"step": step, **values})
    self.writer.write(step, values)
    if jax.process_index() == 0:
      extra = " ".join(f"{k}={v:.4g}" for k, v in values.items()
                       if k not in ("loss", "steps_per_sec", "tokens_per_sec"))
      logging.info("step %d/%d loss=%.4f %.2f steps/s %.0f tokens/s ETA %s %s", step,
                   self.total, values["loss"], rate, rate * self.tokens,
                   format_eta((self.total - step) / rate if rate else math.inf), extra)
