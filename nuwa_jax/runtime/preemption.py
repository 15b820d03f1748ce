"""Pre-emption: on SIGTERM the train loop saves a checkpoint and exits cleanly.

With one process a SIGTERM handler sets a flag. With several processes every host must stop
at the same step, so the decision comes from JAX's distributed preemption sync point (the
coordination service notices the SIGTERM and all hosts agree on the step to stop at).
"""

from __future__ import annotations

import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:

  def __init__(self):
    self._flag = threading.Event()
    self._multi = jax.process_count() > 1
    self._warned = False
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: will save a checkpoint and stop after this step.")
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # jax_enable_preemption_service turned off
        if not self._warned:
          logging.warning("pre-emption sync point unavailable (%s): SIGTERM will not save.", e)
          self._warned = True
        return False
    return self._flag.is_set()


def time_is_up(t_start: float, budget: float) -> bool:
  """Whether `budget` seconds have passed since `t_start`, decided by process 0 for all."""
  up = time.time() - t_start >= budget
  if jax.process_count() > 1:
    up = bool(multihost_utils.broadcast_one_to_all(np.asarray(up)))
  return up
