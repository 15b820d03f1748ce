"""Evaluation of a training run's checkpoints: `python -m nuwa_jax.eval`.

  python -m nuwa_jax.eval --config=configs/eval/nuwa_text.py --workdir=RUN \
      --checkpoint=latest|all|continuous|STEP|PATH [--out=RUN/eval] [--strict] \
      [--config.weights.inception=inception_fid.npz --config.evals.fid.num_samples=500]

The eval config's `evals` (nuwa_jax/evaluators/) run on each chosen checkpoint; without
--config the run's own `config.evals` are used. `all` evaluates every checkpoint and skips
(step, evaluator) pairs already in OUT/metrics.jsonl (resumable); `continuous` also waits for
new checkpoints until training writes FINISHED.json or --timeout seconds pass without one.
Each row of OUT/metrics.jsonl carries its protocol (step, settings, weights sha256, reference
statistics keys, seed), so two numbers can be told comparable or not; scalars also go to
TensorBoard in OUT/tb. Only process 0 writes; every process shares the sampling.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import time
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from nuwa_jax.config_utils import ConfigError, load_json, parse_flags
from nuwa_jax.evaluators import common as eval_common
from nuwa_jax.evaluators import references as references_lib
from nuwa_jax.models import weights as weights_lib
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.runtime.checkpoint import Checkpointer, finished_step
from nuwa_jax.runtime.logs import quiet_library_logs
from nuwa_jax.runtime.metrics import MetricWriter

WEIGHT_KINDS = ("inception", "clip", "i3d")
SAMPLE_TYPES = ("fid", "block_fid", "clip_sim", "captions", "fvd")
RESULTS = "metrics.jsonl"


class EvalError(ValueError):
  """A bad flag, workdir or eval config (reported before anything is compiled)."""


def resolve_evals(run_config, eval_config) -> dict[str, dict]:
  """The evaluators to run: the eval config's, else the run's; weight paths left empty in an
  entry are filled from `eval_config.weights.<kind>`."""
  source = eval_config if eval_config is not None and "evals" in eval_config else run_config
  evals = {name: dict(cfg) for name, cfg in (source.get("evals") or {}).items()}
  if not evals:
    raise EvalError("no evaluators: the eval config has no `evals` and neither has the run.")
  weights = (eval_config or {}).get("weights", {}) or {}
  for name, cfg in evals.items():
    if "type" not in cfg or cfg["type"] not in eval_common.TYPES:
      raise EvalError(f"config.evals.{name}.type={cfg.get('type')!r}: expected one of "
                      f"{eval_common.TYPES}.")
    params = inspect.signature(eval_common.evaluator_class(cfg["type"]).__init__).parameters
    for kind in WEIGHT_KINDS:
      if kind in params and not cfg.get(kind) and weights.get(kind):
        cfg[kind] = weights[kind]
  return evals


def checkpoint_steps(workdir: str) -> list[int]:
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 1, 1000, async_save=False)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def chosen_steps(workdir: str, which: str) -> list[int]:
  steps = checkpoint_steps(workdir)
  if which in ("latest",):
    if not steps:
      raise EvalError(f"--workdir={workdir}: no finished checkpoint in checkpoints/.")
    return steps[-1:]
  if which in ("all", "continuous"):
    return steps
  path = which.rstrip("/")
  step_text = os.path.basename(path) if os.sep in path else path
  if not step_text.isdigit():
    raise EvalError(f"--checkpoint={which}: expected latest, all, continuous, a step number "
                    "or a checkpoint folder named by its step.")
  if int(step_text) not in steps:
    raise EvalError(f"--checkpoint={which}: no finished checkpoint of step {step_text} in "
                    f"{workdir}/checkpoints (has {steps}).")
  return [int(step_text)]


def done_pairs(out: str) -> set[tuple[int, str]]:
  path = os.path.join(out, RESULTS)
  if not os.path.isfile(path):
    return set()
  pairs = set()
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        pairs.add((int(row["step"]), row["eval"]))
  return pairs


_SHA_CACHE: dict[tuple[str, float], str] = {}


def _sha(path: str) -> str:
  key = (os.path.abspath(path), os.path.getmtime(path))
  if key not in _SHA_CACHE:
    _SHA_CACHE[key] = weights_lib.file_sha256(path)
  return _SHA_CACHE[key]


def protocol(entry: eval_common.Entry, step: int, references) -> dict[str, Any]:
  """What makes two rows comparable: the settings, weights sha256 and reference keys."""
  out = {"step": step, "settings": entry.settings}
  shas = {k: _sha(v) for k, v in entry.settings.items()
          if k in WEIGHT_KINDS and v and os.path.isfile(v)}
  if shas:
    out["weights_sha256"] = shas
  if isinstance(references, eval_common.Lazy):  # never made: no sample-based evaluator ran
    references = references.get() if references.ready else None
  keys = getattr(references, "used_keys", None) if references is not None else None
  if keys:
    out["reference_keys"] = sorted(keys)
    keys.clear()
  if references is not None and entry.settings["type"] in SAMPLE_TYPES:
    out["reference_split"] = references.split
    out["reference_resize"] = references_lib.RESIZE
  return out


def append_row(out: str, row: dict) -> None:
  """One JSON line, flushed and fsynced (a crash never leaves half a row in a finished file)."""
  with open(os.path.join(out, RESULTS), "a", encoding="utf-8") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


class Evaluation:
  """A run's evaluators and state layout, built once; `evaluate(step)` runs them."""

  def __init__(self, workdir: str, eval_config, out: str, strict: bool = False):
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      raise EvalError(f"--workdir={workdir}: no config.json there (not a training workdir).")
    self.workdir, self.out, self.strict = workdir, out, strict
    self.run_config = load_json(path)
    name = self.run_config.get("trainer", "")
    try:
      self.trainer = importlib.import_module(f"nuwa_jax.trainers.{name}")
    except ModuleNotFoundError:
      raise EvalError(f"{path}: trainer {name!r} does not exist.") from None
    self.evals = resolve_evals(self.run_config, eval_config)
    mesh = mesh_lib.create_mesh(self.run_config.mesh)
    predictors, self.sharded = self.trainer.make_evaluation(self.run_config, mesh)
    self.entries = eval_common.from_config(self.evals, predictors)
    self.references = predictors.get("references")
    self.samples = predictors.get("samples")
    self.writer = MetricWriter(out, jsonl=False) if jax.process_index() == 0 else None
    self.draws = any(e.settings["type"] in SAMPLE_TYPES for e in self.entries)

  def restore(self, step: int):
    ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), 1, 1000, async_save=False)
    try:
      state, _, _ = ckpt.restore(self.sharded.abstract, step)
    finally:
      ckpt.close()
    return state

  def evaluate(self, step: int, skip: set[tuple[int, str]]) -> int:
    """Runs every evaluator not yet done for `step`; returns how many ran."""
    todo = [e for e in self.entries if (step, e.name) not in skip]
    if not todo:
      return 0
    logging.info("evaluating step %d: %s", step, [e.name for e in todo])
    state = self.restore(step)
    if self.draws:  # samples are saved as PNG exactly as the metrics saw them
      self.samples.get().out_dir = os.path.join(self.out, "samples", f"{step:08d}")
    for entry, scalars, skipped, seconds in eval_common.run(todo, state, self.strict):
      if jax.process_index() != 0:
        continue
      row = {"step": step, "eval": entry.name, "type": entry.settings["type"],
             "values": scalars, "skipped": skipped, "seconds": round(seconds, 2),
             "protocol": protocol(entry, step, self.references), "workdir": self.workdir}
      append_row(self.out, row)
      if scalars:
        self.writer.write(step, scalars)
    return len(todo)

  def close(self):
    if self.writer is not None:
      self.writer.close()


def run(workdir: str, which: str = "latest", eval_config=None, out: str | None = None,
        strict: bool = False, timeout: float = 3600.0, poll: float = 10.0) -> list[int]:
  """Evaluates the chosen checkpoints of `workdir`; returns the steps evaluated."""
  if not workdir or not os.path.isfile(os.path.join(workdir, "config.json")):
    raise EvalError(f"--workdir={workdir}: no config.json there (not a training workdir).")
  out = out or os.path.join(workdir, "eval")
  steps = chosen_steps(workdir, which) if which != "continuous" else checkpoint_steps(workdir)
  os.makedirs(out, exist_ok=True)
  evaluation = Evaluation(workdir, eval_config, out, strict)
  evaluated: list[int] = []
  try:
    skip = done_pairs(out) if which in ("all", "continuous") else set()
    for step in steps:
      if evaluation.evaluate(step, skip):
        evaluated.append(step)
      skip = done_pairs(out) if which in ("all", "continuous") else set()
    if which == "continuous":
      seen, last_new = set(steps), time.time()
      while True:
        new = [s for s in checkpoint_steps(workdir) if s not in seen]
        for step in new:
          seen.add(step)
          if evaluation.evaluate(step, done_pairs(out)):
            evaluated.append(step)
          last_new = time.time()
        finished = finished_step(workdir)
        if finished is not None and not [s for s in checkpoint_steps(workdir) if s not in seen]:
          logging.info("training finished at step %d: continuous evaluation ends", finished)
          break
        if time.time() - last_new > timeout:
          logging.warning("no new checkpoint for %.0f s (--timeout): stopping.", timeout)
          break
        time.sleep(poll)
  finally:
    evaluation.close()
  return evaluated


def define_flags() -> dict:
  """The command's flags (defined only when run as a command, so importing this module leaves
  other programs' and tests' global flags alone)."""
  return dict(
      config=config_flags.DEFINE_config_file(
          "config", None, "Eval config (path[:variant]); default: the run's own config.evals.",
          lock_config=False),
      workdir=flags.DEFINE_string("workdir", None,
                                  "The training run (config.json, checkpoints/)."),
      checkpoint=flags.DEFINE_string("checkpoint", "latest", "latest | all | continuous | a "
                                     "step number | a checkpoint folder (WORKDIR/checkpoints/"
                                     "<step>)."),
      out=flags.DEFINE_string("out", None, "Where results go (default WORKDIR/eval)."),
      strict=flags.DEFINE_bool("strict", False, "A skipped metric (weights missing) is an "
                               "error."),
      timeout=flags.DEFINE_float("timeout", 3600.0, "continuous: stop after this many seconds "
                                 "without a new checkpoint."),
      poll=flags.DEFINE_float("poll", 10.0, "continuous: seconds between looks for "
                              "checkpoints."))


_FLAGS: dict = {}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  f = {k: v.value for k, v in _FLAGS.items()}
  try:
    steps = run(f["workdir"], f["checkpoint"], f["config"], f["out"], f["strict"],
                f["timeout"], f["poll"])
  except (EvalError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except eval_common.SkippedError as e:
    print(f"error: --strict: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"evaluated steps {steps}; results in "
        f"{os.path.join(f['out'] or os.path.join(f['workdir'], 'eval'), RESULTS)}")


if __name__ == "__main__":
  _FLAGS.update(define_flags())
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=parse_flags)
