"""Training entry point for every model of nuwa_jax.

  python -m nuwa_jax.train --config=configs/baseline.py:size=tiny --workdir=/tmp/baseline
  python -m nuwa_jax.train --config=configs/baseline.py:size=tiny --workdir=/tmp/b \
      --config.optimizer.lr=3e-4 --config.mesh.fsdp=2

Several processes (one per host): add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
environment); on TPU VMs jax.distributed starts by itself. `launch/launch.py` does this for
you. Re-running with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nuwa_jax.config_utils import parse_flags, write_config
from nuwa_jax.runtime.checkpoint import clear_finished, mark_finished
from nuwa_jax.runtime import distributed, host_memory
from nuwa_jax.runtime.logs import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  host_memory.keep_freed_memory()  # before JAX starts (runtime/host_memory.py)
  distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax  # pylint: disable=g-import-not-at-top  (after distributed init)
  config = _CONFIG.value
  try:
    trainer = importlib.import_module(f"nuwa_jax.trainers.{config.trainer}")
  except ModuleNotFoundError:
    raise app.UsageError(f"--config: trainer {config.trainer!r} does not exist "
                         "(expected a module in nuwa_jax/trainers/).") from None
  try:
    trainer.validate(config)
  except ValueError as e:
    logging.error("bad config: %s", e)
    print(f"error: bad config: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    logging.info("config written to %s", write_config(config, _WORKDIR.value))
    clear_finished(_WORKDIR.value)
  result = trainer.train(config, _WORKDIR.value)
  if jax.process_index() == 0 and not result.get("preempted"):
    mark_finished(_WORKDIR.value, int(result["last_step"]))


if __name__ == "__main__":
  # Required only as a command: importing this module (for its functions) leaves the global
  # flags of other programs and tests alone.
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
