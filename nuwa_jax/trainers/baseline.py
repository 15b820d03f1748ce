"""Trainer for the DALL·E-style baseline (configs/baseline.py).

One readable script in sections: config checks, input, model and optimizer, sharding, step
functions, checkpoint, loop. `build` is shared with `nuwa_jax.tools.aot`, which compiles the
same step for a TPU topology.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from nuwa_jax.config_utils import (ConfigError, check_batch_layout, check_choice,
                                   check_positive)
from nuwa_jax.data.pipeline import HostBatchIterator, abstract_batch
from nuwa_jax.data.synthetic_tokens import SyntheticTokens
from nuwa_jax.evaluators import common as eval_common
from nuwa_jax.models import baseline as baseline_model
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.runtime import sharding as shd
from nuwa_jax.runtime.checkpoint import Checkpointer
from nuwa_jax.runtime.metrics import AsyncMetrics, MetricWriter
from nuwa_jax.runtime.optimizer import SCHEDULES, make_optimizer
from nuwa_jax.runtime.preemption import PreemptionWatcher
from nuwa_jax.runtime.train_state import ShardedState, compile_step, make_train_step


# ----------------------------------------------------------------------------------------
# Config checks (before any compile)
# ----------------------------------------------------------------------------------------

def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  """Raises ConfigError (or MeshConfigError / ShardingError) naming the bad key.

  Args:
    num_devices, num_processes: of the job to check for (default: this one), so that
      `nuwa_jax.tools.aot` can check a pod's config on one CPU.
  """
  check_positive(config, "config", "total_steps", "batch_size", "log_every_steps")
  check_positive(config.model, "config.model", "width", "depth", "num_heads", "mlp_dim",
                 "image_vocab", "image_rows", "image_cols", "text_vocab")
  check_positive(config.model, "config.model", "text_len", "dropout", allow_zero=True)
  check_positive(config.optimizer, "config.optimizer", "lr")
  check_positive(config.checkpoint, "config.checkpoint", "every_steps", "keep")
  check_choice("config.model.dtype", config.model.dtype, ("float32", "bfloat16"))
  check_choice("config.model.remat", config.model.remat, ("none", "full", "dots"))
  check_choice("config.optimizer.decay", config.optimizer.decay, SCHEDULES)
  check_choice("config.data.name", config.data.name, ("synthetic_tokens",))
  if config.model.width % config.model.num_heads:
    raise ConfigError(f"config.model.width={config.model.width} is not divisible by "
                      f"config.model.num_heads={config.model.num_heads}.")
  if not 0 <= config.model.dropout < 1:
    raise ConfigError(f"config.model.dropout={config.model.dropout}: expected [0, 1).")
  check_batch_layout(config, num_devices, num_processes)


# ----------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------

def make_sources(config):
  m, d = config.model, config.data
  kw = dict(rows=m.image_rows, cols=m.image_cols, text_len=m.text_len,
            image_vocab=m.image_vocab, text_vocab=m.text_vocab, noise=d.noise)
  return (SyntheticTokens(d.num_train, seed=config.seed, **kw),
          SyntheticTokens(d.num_eval, seed=config.seed + 10_000, **kw))


# ----------------------------------------------------------------------------------------
# Model, loss, step functions
# ----------------------------------------------------------------------------------------

def loss_fn(model, label_smoothing: float):
  def fn(params, batch, rng):
    logits = model.apply({"params": params}, batch["text"], batch["image"], train=True,
                         rngs={"dropout": rng})
    return image_token_loss(logits, batch["image"], label_smoothing)
  return fn


def image_token_loss(logits, targets, label_smoothing: float = 0.0):
  """Mean cross-entropy (with optional label smoothing) and accuracy over image tokens."""
  vocab = logits.shape[-1]
  onehot = jax.nn.one_hot(targets, vocab)
  nll = optax.softmax_cross_entropy(logits, onehot).mean()
  if label_smoothing:
    smoothed = optax.smooth_labels(onehot, label_smoothing)
    loss = optax.softmax_cross_entropy(logits, smoothed).mean()
  else:
    loss = nll
  accuracy = (logits.argmax(-1) == targets).mean()
  return loss, {"nll": nll, "accuracy": accuracy}


@dataclasses.dataclass
class Layout:
  """Model, optimizer and the sharded state layout on one mesh (nothing compiled or allocated)."""
  model: Any
  tx: Any
  schedule: Any
  sharded: ShardedState
  abstract_batch: Any  # global batch: ShapeDtypeStructs with shardings
  tokens_per_step: int

  def train_args(self) -> tuple:
    """Abstract arguments of the train step (for tracing without data)."""
    return self.sharded.abstract, self.abstract_batch


@dataclasses.dataclass
class Built:
  """Everything the loop needs: the layout plus the compiled step functions."""
  layout: Layout
  train_step: Any  # compiled
  eval_step: Any  # compiled
  batch_sharding: Any
  train_source: Any
  eval_source: Any

  @property
  def sharded(self) -> ShardedState:
    return self.layout.sharded


def make_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> Layout:
  """Builds the model and optimizer and lays the train state out on `mesh`."""
  rules = config.sharding.rules
  batch_sharding = shd.logical_sharding(("batch",), mesh, rules)
  batch_spec = abstract_batch(make_sources(config)[0][0], config.batch_size, batch_sharding)
  model = baseline_model.Model(**config.model)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  dummy = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in batch_spec.items()}
  sharded = ShardedState(lambda rng: model.init(rng, dummy["text"], dummy["image"])["params"],
                         tx, mesh, rules)
  sharded.check(config.sharding.max_replicated_size)
  tokens = config.batch_size * (config.model.text_len + config.model.image_rows *
                                config.model.image_cols)
  return Layout(model, tx, schedule, sharded, batch_spec, tokens)


def make_train_fn(config: ml_collections.ConfigDict, layout: Layout):
  """The (uncompiled) train step `(state, batch) -> (state, metrics)`."""
  return make_train_step(loss_fn(layout.model, config.label_smoothing), layout.tx,
                         layout.schedule, config.seed)


def build(config: ml_collections.ConfigDict, mesh: Mesh, train: bool = True) -> Built:
  """Lays out the state and compiles the train (unless train=False) and eval steps."""
  layout = make_layout(config, mesh)
  model, sharded, batch_spec = layout.model, layout.sharded, layout.abstract_batch
  train_step = (compile_step(make_train_fn(config, layout), sharded, batch_spec) if train
                else None)

  def eval_fn(params, batch):
    logits = model.apply({"params": params}, batch["text"], batch["image"])
    return image_token_loss(logits, batch["image"])[1]

  with shd.activation_sharding(mesh, config.sharding.rules):
    eval_step = jax.jit(eval_fn, in_shardings=(sharded.shardings.params,
                                               jax.tree.map(lambda a: a.sharding, batch_spec)),
                        out_shardings=sharded.replicated()).lower(
                            sharded.abstract.params, batch_spec).compile()
  train_source, eval_source = make_sources(config)
  return Built(layout, train_step, eval_step,
               shd.logical_sharding(("batch",), mesh, config.sharding.rules), train_source,
               eval_source)


def make_evaluation(config, mesh: Mesh) -> tuple[dict[str, Any], ShardedState]:
  """(predictors, sharded state layout) for evaluating checkpoints of this config."""
  built = build(config, mesh, train=False)
  return predictors(config, built), built.sharded


def predictors(config, built: Built) -> dict[str, Any]:
  """What the evaluators of `config.evals` may use (nuwa_jax/evaluators/common.py)."""
  def eval_batches(count):
    it = HostBatchIterator(built.eval_source, config.batch_size, built.batch_sharding,
                           seed=0, shuffle=False)
    return (next(it) for _ in range(count))
  return {"eval_batches": eval_batches, "eval_step": built.eval_step}


# ----------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from workdir/checkpoints if present); returns the logged history."""
  validate(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  logging.info("mesh: %s", mesh_lib.describe(mesh))
  built = build(config, mesh)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(built.sharded.abstract.params))
  logging.info("baseline: %.2fM parameters, %d tokens/step", n_params / 1e6,
               built.layout.tokens_per_step)

  evals = eval_common.from_config(config.evals, predictors(config, built))
  ckpt = Checkpointer(f"{workdir}/checkpoints", config.checkpoint.every_steps,
                      config.checkpoint.keep, config.checkpoint.async_save)
  state, data_state, start = ckpt.restore_or_init(built.sharded, config.seed)
  batches = HostBatchIterator(built.train_source, config.batch_size, built.batch_sharding,
                              seed=config.seed, start_batch=data_state["batches"])

  writer = MetricWriter(workdir)
  metrics = AsyncMetrics(writer, config.total_steps, built.layout.tokens_per_step,
                         config.log_every_steps, first_step=start)
  preemption = PreemptionWatcher()
  last = config.total_steps if config.stop_at_step <= 0 else min(config.stop_at_step,
                                                                  config.total_steps)
  step, stop = start, False
  try:
    for step in range(start + 1, last + 1):
      state, step_metrics = built.train_step(state, next(batches))
      metrics.push(step, step_metrics)
      stop = preemption.should_stop(step)
      ckpt.maybe_save(step, state, batches.state(), force=stop or step == last)
      todo = eval_common.due(evals, step, step - 1, step == last)
      if todo:
        metrics.flush()
        eval_common.run_and_write(todo, state, step, writer)
      if stop:
        logging.warning("pre-empted: checkpoint of step %d saved, exiting.", step)
        break
    metrics.flush()
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return {"history": metrics.history, "last_step": step, "state": state,
          "preempted": bool(stop)}
