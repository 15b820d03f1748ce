"""Orbax checkpoints of the train state and the data iterator position.

- asynchronous saves every `every_steps`, the last `keep` kept; orbax writes each step into a
  temporary directory and renames it when complete, so a half-written step is never listed or
  read back;
- every restore targets the *current* mesh's shardings (abstract arrays carrying shardings),
  so a run saved on one mesh or device count resumes on another;
- the data iterator position is saved beside the state as JSON.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores {state, data} under `directory` (local path or gs://)."""

  def __init__(self, directory: str, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self.every_steps = every_steps
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def maybe_save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    """Starts an asynchronous save when `step` is a multiple of `every_steps` (or `force`).

    Returns whether it saved. The device-to-host copy happens before this returns, so the
    caller may donate `state` to the next step right away.
    """
    if not (force or step % self.every_steps == 0) or step == self.latest_step():
      return False
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return True

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores `step` (default: latest) onto the shardings carried by `abstract_state`.

    Returns:
      (state, data iterator state, step).
    Raises:
      FileNotFoundError: no finished checkpoint in the directory.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {self.directory}.")
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"], restored["data"], step

  def restore_or_init(self, sharded, seed: int) -> tuple[Any, dict, int]:
    """The latest checkpoint on `sharded`'s layout, or a fresh state (step 0, no data used)."""
    if self.latest_step() is not None:
      return self.restore(sharded.abstract)
    return sharded.init(jax.random.key(seed)), {"batches": 0}, 0

  def wait(self) -> None:
    """Blocks until any asynchronous save has finished."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """Only the parameters of a train-state checkpoint (for evaluation and sampling)."""
  ckpt = Checkpointer(directory, every_steps=1, keep=1, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory}.")
    restored = ckpt._mngr.restore(step, args=ocp.args.Composite(  # pylint: disable=protected-access
        state=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                      {"params": abstract_params}),
            partial_restore=True)))
    return restored["state"]["params"]
  finally:
    ckpt.close()


FINISHED = "FINISHED.json"  # written by the train command when a run ends (not pre-empted)


def mark_finished(workdir: str, step: int) -> str:
  """Records that training in `workdir` ended at `step` (continuous evaluation stops then)."""
  path = os.path.join(workdir, FINISHED)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"step": int(step), "time": time.time()}, f)
  os.replace(path + ".tmp", path)
  return path


def clear_finished(workdir: str) -> None:
  """A run that starts (again) is not finished."""
  if os.path.isfile(os.path.join(workdir, FINISHED)):
    os.remove(os.path.join(workdir, FINISHED))


def finished_step(workdir: str) -> int | None:
  """The step recorded by `mark_finished`, or None while training has not finished."""
  path = os.path.join(workdir, FINISHED)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return int(json.load(f)["step"])
