"""Evaluators chosen by config, as big_vision builds them: `config.evals.<name> = dict(type=...)`.

Each type is a module `nuwa_jax/evaluators/<type>.py` with a class `Evaluator(**settings,
**predictors)` whose `run(state)` yields `(key, value)`; results are logged as `<name>/<key>`.
`NEEDS` on the class names the predictors (functions and data the trainer or the eval command
hands over: `chain_nll`, `chains`, `reconstruct`, `samples`, ...), so an evaluator never
reaches into a model. A metric that cannot run here (weights missing) yields `Skipped(reason)`;
with `strict` that is an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import time
from typing import Any, Iterable, Iterator, Mapping

from absl import logging

from nuwa_jax.config_utils import ConfigError

TYPES = ("nll", "token_loss", "tokenizer", "fid", "block_fid", "clip_sim", "captions", "fvd")


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A metric that was not computed, and why (weights file missing, no such data, ...)."""
  reason: str


class SkippedError(RuntimeError):
  """Raised instead of yielding `Skipped` when evaluation is strict."""


@dataclasses.dataclass
class Entry:
  name: str
  evaluator: Any
  every_steps: int  # 0: only when asked for (the eval command, the last step)
  settings: dict


class Lazy:
  """A predictor made on first use (attribute access or call): loading a tokenizer or a
  dataset only when an evaluator that needs it runs."""

  def __init__(self, factory):
    self._factory, self._value = factory, None

  @property
  def ready(self) -> bool:
    return self._value is not None

  def get(self):
    if self._value is None:
      self._value = self._factory()
    return self._value

  def __getattr__(self, name):
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self.get(), name)

  def __call__(self, *args, **kwargs):
    return self.get()(*args, **kwargs)


def _settings(name: str, cfg: Mapping[str, Any]) -> tuple[str, int, dict]:
  cfg = dict(cfg)
  if "type" not in cfg:
    raise ConfigError(f"config.evals.{name}: no 'type' (one of {TYPES}).")
  kind = cfg.pop("type")
  if kind not in TYPES:
    raise ConfigError(f"config.evals.{name}.type={kind!r}: expected one of {TYPES}.")
  every = int(cfg.pop("every_steps", 0) or 0)
  if every < 0:
    raise ConfigError(f"config.evals.{name}.every_steps={every}: expected >= 0.")
  return kind, every, cfg


def evaluator_class(kind: str):
  return importlib.import_module(f"nuwa_jax.evaluators.{kind}").Evaluator


def from_config(evals: Mapping[str, Mapping[str, Any]] | None,
                predictors: Mapping[str, Any]) -> list[Entry]:
  """Builds every evaluator of `config.evals` with the predictors it names in NEEDS.

  Raises:
    ConfigError: an unknown type or setting, or a predictor this trainer does not provide,
      naming the `config.evals.<name>` entry.
  """
  entries = []
  for name, cfg in sorted((evals or {}).items()):
    kind, every, settings = _settings(name, cfg)
    cls = evaluator_class(kind)
    missing = [n for n in cls.NEEDS if n not in predictors]
    if missing:
      raise ConfigError(f"config.evals.{name} (type {kind}) needs {missing}, which this model "
                        f"does not provide (it provides {sorted(predictors)}).")
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in settings if k not in params or k in cls.NEEDS)
    if unknown:
      allowed = sorted(k for k in params if k not in ("self",) + tuple(cls.NEEDS))
      raise ConfigError(f"config.evals.{name}: unknown setting(s) {unknown} for type {kind} "
                        f"(allowed: {allowed}).")
    try:
      evaluator = cls(**settings, **{n: predictors[n] for n in cls.NEEDS})
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.evals.{name}: {e}") from e
    entries.append(Entry(name, evaluator, every, {"type": kind, **settings}))
  return entries


def due(entries: Iterable[Entry], step: int, previous_step: int, last: bool) -> list[Entry]:
  """Entries whose `every_steps` boundary falls in (previous_step, step], or all at the end."""
  out = []
  for e in entries:
    crossed = e.every_steps and step // e.every_steps > previous_step // e.every_steps
    if crossed or last:
      out.append(e)
  return out


def _scalar(value: Any) -> float | None:
  try:
    v = float(value)
  except (TypeError, ValueError):
    return None
  return v


def run(entries: Iterable[Entry], state: Any, strict: bool = False
        ) -> Iterator[tuple[Entry, dict[str, float], dict[str, str], float]]:
  """Runs each evaluator; yields (entry, {'<name>/<key>': value}, {key: skip reason}, seconds).

  Non-scalar values (settings, intervals given as tuples) are kept under their key as
  strings in the skip map's sibling: only finite-or-not floats go to the scalar dict.
  """
  for entry in entries:
    t0 = time.time()
    scalars, skipped = {}, {}
    for key, value in entry.evaluator.run(state):
      full = f"{entry.name}/{key}" if key else entry.name
      if isinstance(value, Skipped):
        if strict:
          raise SkippedError(f"{full}: skipped: {value.reason}")
        skipped[full] = value.reason
        logging.warning("%s skipped: %s", full, value.reason)
        continue
      v = _scalar(value)
      if v is None:
        raise TypeError(f"{full}: evaluator yielded {type(value).__name__}, expected a number.")
      scalars[full] = v
    seconds = time.time() - t0
    shown = " ".join(f"{k}={v:.4g}" for k, v in list(scalars.items())[:12])
    logging.info("eval %s (%.1f s): %s%s", entry.name, seconds, shown,
                 " ..." if len(scalars) > 12 else "")
    yield entry, scalars, skipped, seconds


def run_and_write(entries: Iterable[Entry], state: Any, step: int, writer,
                  strict: bool = False) -> dict[str, float]:
  """`run`, then every scalar written at `step` with `writer` (a MetricWriter)."""
  out: dict[str, float] = {}
  for _, scalars, _, _ in run(entries, state, strict):
    out.update(scalars)
  if out:
    writer.write(step, out)
  return out


def bits(nats: float) -> float:
  return nats / math.log(2)
