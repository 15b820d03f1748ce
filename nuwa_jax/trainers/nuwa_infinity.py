"""Trainer for NUWA-Infinity (configs/nuwa_infinity.py): render-and-optimize.

For each batch of chains (B examples cut to one patch grid, an order per example): for each
patch in order, gather its context from the pool, teacher-forced loss, one optimizer update for
this patch, cache the patch's hidden states in the pool (computed before the update, never
differentiated), remove expired entries (their slots are simply reused; see
context_pool.py). `config.mode = "full_chain"` instead takes one update for the summed loss of
the whole chain (a scan over its patches), to compare.

The per-patch step has the same shapes for every patch, order and canvas size (the context is
`context_entries(config)` entries, each a pool slot, an offset index and a validity flag; the
pool has `model.pool_slots` slots), so it compiles once. Sections: config
checks, input, model and steps, build, evaluation, loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from nuwa_jax import context_pool
from nuwa_jax.config_utils import (ConfigError, check_batch_layout, check_choice,
                                   check_positive)
from nuwa_jax.data import datasets
from nuwa_jax.data import references as data_refs
from nuwa_jax.data.pipeline import HostBatchIterator
from nuwa_jax.data.token_grids import ChainBatch, SyntheticTokenGrids, unigram_cross_entropy
from nuwa_jax.evaluators import common as eval_common
from nuwa_jax.evaluators import references as evaluator_refs
from nuwa_jax.evaluators import sampling
from nuwa_jax.models import nuwa as nuwa_model
from nuwa_jax.nuwa.pool import gather_memory, write_pool
from nuwa_jax.orders import DIRECTIONS
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.runtime import sharding as shd
from nuwa_jax.runtime.checkpoint import Checkpointer
from nuwa_jax.runtime.metrics import AsyncMetrics, MetricWriter
from nuwa_jax.runtime.optimizer import SCHEDULES, make_optimizer
from nuwa_jax.runtime.preemption import PreemptionWatcher, time_is_up
from nuwa_jax.runtime.train_state import ShardedState, TrainState
from nuwa_jax.trainers.baseline import image_token_loss

POOL_AXES = ("layers", "batch", None, "length", "act_embed")
STEP_FIELDS = {  # per-patch inputs: (dtype, shape after the batch axis); M context entries
    "tokens": (np.int32, ("P",)), "context_slot": (np.int32, ("M",)),
    "context_offset": (np.int32, ("M",)), "context_valid": (np.bool_, ("M",)),
    "write_slot": (np.int32, ()), "text": (np.int32, ("L",)), "text_mask": (np.bool_, ("L",))}


@functools.lru_cache(maxsize=64)
def _max_valid_context(grids, extent, order):
  return context_pool.max_valid_context(grids, extent, order)


def context_entries(config) -> int:
  """M, the context entries of each per-patch step: `config.model.max_context`, or when it is
  0 the most valid entries any order of the library (every raster, and rings when
  config.order is 'random') produces on any of `config.grids` for the extent."""
  m = config.model
  if m.get("max_context", 0):
    return int(m.max_context)
  return _max_valid_context(tuple(tuple(int(x) for x in g) for g in config.grids),
                            tuple(int(e) for e in m.extent), config.order)


# ----------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------

def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  m = config.model
  check_positive(config, "config", "total_steps", "batch_size", "log_every_steps")
  check_positive(m, "config.model", "vocab", "patch_rows", "patch_cols", "width", "depth",
                 "num_heads", "mlp_dim", "pool_slots")
  check_positive(m, "config.model", "text_len", "dropout", "max_context", allow_zero=True)
  check_positive(config.optimizer, "config.optimizer", "lr")
  check_choice("config.mode", config.mode, ("render_and_optimize", "full_chain"))
  check_choice("config.order", config.order, ("random",) + DIRECTIONS)
  check_choice("config.model.dtype", m.dtype, ("float32", "bfloat16"))
  check_choice("config.model.remat", m.remat, ("none", "full", "dots"))
  check_choice("config.optimizer.decay", config.optimizer.decay, SCHEDULES)
  check_choice("config.data.name", config.data.name, ("synthetic_token_grids", "token_grids"))
  if m.width % m.num_heads:
    raise ConfigError(f"config.model.width={m.width} is not divisible by "
                      f"config.model.num_heads={m.num_heads}.")
  if len(m.extent) != 3 or min(m.extent) < 0:
    raise ConfigError(f"config.model.extent={tuple(m.extent)}: expected (e_t, e_h, e_w) >= 0.")
  if not 0 <= config.cond_dropout <= 1:
    raise ConfigError(f"config.cond_dropout={config.cond_dropout}: expected [0, 1].")
  if not config.grids or any(len(g) != 3 or min(g) < 1 for g in config.grids):
    raise ConfigError(f"config.grids={config.grids}: expected (frames, rows, cols) patches.")
  k = context_pool.num_offsets(m.extent)
  if m.max_context > k:
    raise ConfigError(f"config.model.max_context={m.max_context} exceeds the {k} offsets of "
                      f"extent {tuple(m.extent)}.")
  check_batch_layout(config, num_devices, num_processes)


# ----------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------

def make_sources(config):
  """Train and held-out token-grid sources.

  `data.name = "token_grids"`: the pre-tokenised datasets of `config.data.dataset` (chunk
  folders of nuwa_jax.data.pretokenize, comma-separated to mix images, captioned images and
  clips) as `TokenMix`es; mismatches with the model (vocabularies, grids larger than the data)
  are ConfigErrors raised here, before anything is compiled.
  """
  d, m = config.data, config.model
  if d.name == "synthetic_token_grids":
    frames = max(g[0] for g in config.grids)
    rows = max(g[1] for g in config.grids) * m.patch_rows
    cols = max(g[2] for g in config.grids) * m.patch_cols
    kw = dict(frames=frames, rows=rows, cols=cols, vocab=m.vocab, mirror=d.mirror,
              moving=frames > 1, text_len=m.text_len)
    return (SyntheticTokenGrids(d.num_train, seed=config.seed, **kw),
            SyntheticTokenGrids(d.num_eval, seed=config.seed + 10_000, **kw))
  from nuwa_jax.data import pretokenize  # pylint: disable=g-import-not-at-top
  train_source, eval_source = pretokenize.token_sources(config)
  for name, train, test in zip(eval_source.names, train_source.sources, eval_source.sources):
    logging.info("held-out %s: unigram baseline nll %.3f (train-split token frequencies)",
                 name, unigram_cross_entropy(train, test, m.vocab))
  for name, ev in (config.get("evals") or {}).items():
    if ev.get("type") == "nll" and ev.get("num_chains", 6) < len(eval_source.names):
      logging.warning("config.evals.%s.num_chains=%d < %d datasets: held-out scores miss some "
                      "of them.", name, ev.get("num_chains", 6), len(eval_source.names))
  return train_source, eval_source


def make_batches(config, source, mesh: Mesh, start_batch: int = 0, train: bool = True
                 ) -> HostBatchIterator:
  """This host's batches of `source`: shuffled by the seed for training (unless the source
  shuffles by itself, as TokenMix does), in order for evaluation."""
  sharding = shd.logical_sharding(("batch",), mesh, config.sharding.rules)
  return HostBatchIterator(source, config.batch_size, sharding,
                           seed=config.seed if train else 0, start_batch=start_batch,
                           shuffle=train and not getattr(source, "shuffles_itself", False))


def chain_rngs(seed: int, positions) -> list[np.random.Generator]:
  return [np.random.default_rng([seed, 3, int(p)]) for p in positions]


def grid_for_chain(config, chain: int) -> tuple[int, int, int]:
  """The patch grid of global chain batch `chain` (multi-size training)."""
  rng = np.random.default_rng([config.seed, 5, chain])
  return tuple(config.grids[int(rng.integers(len(config.grids)))])


def next_chain(config, batches: HostBatchIterator, order: str) -> ChainBatch:
  """This host's part of the next batch of chains (its grid comes with the examples from a
  TokenMix, else from `grid_for_chain`)."""
  chain = batches.batches
  local = batches.next_local()
  positions = chain * config.batch_size + batches.lo + np.arange(batches.hi - batches.lo)
  examples = [{k: local[k][i] for k in ("tokens", "text", "text_mask")}
              for i in range(len(positions))]
  grid = (tuple(int(x) for x in local["grid"][0]) if "grid" in local
          else grid_for_chain(config, chain))
  m = config.model
  out = ChainBatch(examples, grid, (m.patch_rows, m.patch_cols), tuple(m.extent), m.pool_slots,
                   chain_rngs(config.seed, positions), order,
                   max_context=context_entries(config))
  if "kind" in local:
    out.kind = int(local["kind"][0])
  return out


# ----------------------------------------------------------------------------------------
# Model and steps
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Layout:
  model: Any
  tx: Any
  schedule: Any
  sharded: ShardedState
  abstract_batch: Any  # one patch step's inputs
  abstract_pool: Any
  tokens_per_step: int

  def train_args(self) -> tuple:
    """Abstract arguments of the per-patch train step (for tracing without data)."""
    return self.sharded.abstract, self.abstract_pool, self.abstract_batch


def _field_shape(dims, m, num_context):
  return tuple({"P": m.patch_rows * m.patch_cols, "M": num_context, "L": m.text_len}[d]
               for d in dims)


def make_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> Layout:
  m = config.model
  model = nuwa_model.Model(**{**m, "extent": tuple(m.extent)})
  rules = config.sharding.rules
  b = config.batch_size
  batch_sharding = shd.logical_sharding(("batch",), mesh, rules)
  abstract = {}
  for name, (dtype, dims) in STEP_FIELDS.items():
    shape = (b,) + _field_shape(dims, m, context_entries(config))
    spec = tuple(batch_sharding.spec) + (None,) * (len(shape) - 1)
    abstract[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*spec)))
  pool_shape = (m.depth, b, m.pool_slots, m.patch_rows * m.patch_cols, m.width)
  pool = jax.ShapeDtypeStruct(pool_shape, nuwa_model._dtype(m.dtype),  # pylint: disable=protected-access
                              sharding=shd.logical_sharding(POOL_AXES, mesh, rules))
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)

  def init_params(rng):
    dummy = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in abstract.items()}
    memory = jnp.zeros((m.depth, 1, context_entries(config)) + pool_shape[3:], pool.dtype)
    return model.init(rng, dummy["tokens"], memory, dummy["context_valid"], dummy["text"],
                      dummy["text_mask"], memory_offset=dummy["context_offset"])["params"]

  sharded = ShardedState(init_params, tx, mesh, rules)
  sharded.check(config.sharding.max_replicated_size)
  return Layout(model, tx, schedule, sharded, abstract, pool, b * m.patch_rows * m.patch_cols)


def patch_forward(model, params, pool, batch, rng, cond_dropout: float, train: bool):
  """Logits and hidden states of one patch with its context gathered from the pool.

  batch: tokens, context_slot, context_valid, write_slot, text, text_mask and optionally
  context_offset (each entry's offset index; without it entry k has offset k)."""
  text_mask = batch["text_mask"]
  if train and cond_dropout and model.text_len:
    keep = jax.random.uniform(jax.random.fold_in(rng, 1), (text_mask.shape[0], 1)) >= cond_dropout
    text_mask = text_mask & keep
  memory = gather_memory(pool, batch["context_slot"])
  return model.apply({"params": params}, batch["tokens"], memory, batch["context_valid"],
                     batch["text"], text_mask, train=train,
                     memory_offset=batch.get("context_offset"),
                     rngs={"dropout": jax.random.fold_in(rng, 2)})


def make_train_fn(config: ml_collections.ConfigDict, layout: Layout):
  """The per-patch train step `(state, pool, batch) -> (state, pool, metrics)`."""
  model, tx, schedule = layout.model, layout.tx, layout.schedule

  def step(state: TrainState, pool, batch):
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def loss_fn(params):
      logits, hidden = patch_forward(model, params, pool, batch, rng, config.cond_dropout,
                                     train=True)
      loss, aux = image_token_loss(logits, batch["tokens"], config.label_smoothing)
      return loss, (aux, hidden)

    (loss, (aux, hidden)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, write_pool(pool, batch["write_slot"], hidden), metrics

  return step


def make_chain_fn(config: ml_collections.ConfigDict, layout: Layout):
  """Full-chain step `(state, pool, chain) -> (state, pool, metrics)`: one update for the mean
  loss over every patch of the chain (chain fields are [N, B, ...])."""
  model, tx, schedule = layout.model, layout.tx, layout.schedule

  def step(state: TrainState, pool, chain):
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def loss_fn(params):
      def body(carry, inputs):
        pool, i = carry
        batch = dict(inputs, text=chain["text"], text_mask=chain["text_mask"])
        logits, hidden = patch_forward(model, params, pool, batch, jax.random.fold_in(rng, i),
                                       config.cond_dropout, train=True)
        loss, aux = image_token_loss(logits, batch["tokens"], config.label_smoothing)
        return (write_pool(pool, batch["write_slot"], hidden), i + 1), (loss, aux)
      per_step = {k: v for k, v in chain.items() if k not in ("text", "text_mask")}
      (pool_out, _), (losses, aux) = jax.lax.scan(body, (pool, 0), per_step)
      return losses.mean(), (jax.tree.map(jnp.mean, aux), pool_out)

    (loss, (aux, pool_out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return (TrainState(step=state.step + 1, params=params, opt_state=opt_state),
            jax.lax.stop_gradient(pool_out), metrics)

  return step


def make_eval_fn(config, layout: Layout):
  """`(params, pool, batch) -> (pool, per-example nll [B])` for one patch, no update."""
  model = layout.model

  def eval_step(params, pool, batch):
    logits, hidden = patch_forward(model, params, pool, batch, jax.random.key(0), 0.0,
                                   train=False)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"]).mean(-1)
    return write_pool(pool, batch["write_slot"], hidden), nll

  return eval_step


# ----------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
  layout: Layout
  train_step: Any  # compiled per-patch step
  eval_step: Any  # compiled
  mesh: Mesh

  @property
  def sharded(self) -> ShardedState:
    return self.layout.sharded


def _shardings(tree):
  return jax.tree.map(lambda a: a.sharding, tree)


def build(config: ml_collections.ConfigDict, mesh: Mesh, train: bool = True) -> Built:
  """Lays out the state and compiles the per-patch train (unless train=False) and eval
  steps, once each."""
  layout = make_layout(config, mesh)
  sharded, pool, batch = layout.sharded, layout.abstract_pool, layout.abstract_batch
  with shd.activation_sharding(mesh, config.sharding.rules):
    train_step = jax.jit(
        make_train_fn(config, layout),
        in_shardings=(sharded.shardings, pool.sharding, _shardings(batch)),
        out_shardings=(sharded.shardings, pool.sharding, sharded.replicated()),
        donate_argnums=(0, 1)).lower(sharded.abstract, pool, batch).compile() if train else None
    eval_step = jax.jit(
        make_eval_fn(config, layout),
        in_shardings=(sharded.shardings.params, pool.sharding, _shardings(batch)),
        out_shardings=(pool.sharding, sharded.replicated()),
        donate_argnums=(1,)).lower(sharded.abstract.params, pool, batch).compile()
  return Built(layout, train_step, eval_step, mesh)


def compile_chain_step(config, built: Built, num_steps: int):
  """The full-chain step for chains of `num_steps` patches (compiled per chain length)."""
  layout, mesh = built.layout, built.mesh
  per_step = {k: jax.ShapeDtypeStruct((num_steps,) + v.shape, v.dtype,
                                      sharding=jax.sharding.NamedSharding(
                                          mesh, jax.sharding.PartitionSpec(
                                              None, *v.sharding.spec)))
              for k, v in layout.abstract_batch.items() if k not in ("text", "text_mask")}
  chain = dict(per_step, text=layout.abstract_batch["text"],
               text_mask=layout.abstract_batch["text_mask"])
  sharded, pool = layout.sharded, layout.abstract_pool
  with shd.activation_sharding(mesh, config.sharding.rules):
    return jax.jit(make_chain_fn(config, layout),
                   in_shardings=(sharded.shardings, pool.sharding, _shardings(chain)),
                   out_shardings=(sharded.shardings, pool.sharding, sharded.replicated()),
                   donate_argnums=(0, 1)).lower(sharded.abstract, pool, chain).compile()


def new_pool(built: Built):
  pool = built.layout.abstract_pool
  return jax.jit(lambda: jnp.zeros(pool.shape, pool.dtype), out_shardings=pool.sharding)()


def to_global(built: Built, local: dict[str, np.ndarray], leading: int = 0) -> dict:
  """Host-local per-step (or per-chain with `leading` extra axes) arrays → global arrays."""
  out = {}
  for k, v in local.items():
    abstract = built.layout.abstract_batch[k]
    spec = (None,) * leading + tuple(abstract.sharding.spec)
    sharding = jax.sharding.NamedSharding(built.mesh, jax.sharding.PartitionSpec(*spec))
    shape = v.shape[:leading] + abstract.shape
    out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v, abstract.dtype),
                                                    shape)
  return out


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

def chain_nll(config, built: Built, params, chain: ChainBatch, empty_pool: bool = False
              ) -> np.ndarray:
  """Per-patch, per-example nll [N, B_local] of a chain; `empty_pool` hides all context."""
  pool = new_pool(built)
  out = []
  for i in range(chain.num_steps):
    inputs = chain.step(i)
    if empty_pool:
      inputs = dict(inputs, context_valid=np.zeros_like(inputs["context_valid"]))
    pool, nll = built.eval_step(params, pool, to_global(built, inputs))
    out.append(np.asarray(jax.device_get(nll)))
  return np.stack(out)


def held_out_chains(config, built: Built, source, order: str, count: int):
  """`count` fixed held-out batches of chains in `order` (the same ones every time)."""
  it = make_batches(config, source, built.mesh, train=False)
  for _ in range(count):
    yield next_chain(config, it, order)


def predictors(config, built: Built, eval_source) -> dict[str, Any]:
  """What the evaluators of `config.evals` may use (see nuwa_jax/evaluators/common.py).

  `samples` and `references` are built on first use (they load the tokenizer named by the
  data), so runs without sample-based evaluators never touch them."""
  def samples():
    return sampling.from_config(config)

  def references():
    folders = [f for f in config.data.get("dataset", "").split(",") if f]
    names = getattr(eval_source, "names", ())
    data_dir = config.data.get("data_dir", "") or datasets.default_data_dir()
    return evaluator_refs.References(
        {n: data_refs.source_dir(f, data_dir) for n, f in zip(names, folders)},
        os.path.join(data_dir, "reference_stats"))

  return {"chains": lambda order, count: held_out_chains(config, built, eval_source, order,
                                                         count),
          "chain_nll": lambda params, chain, empty: chain_nll(config, built, params, chain,
                                                              empty),
          "dataset_names": tuple(getattr(eval_source, "names", ())),
          "samples": eval_common.Lazy(samples), "references": eval_common.Lazy(references)}


def make_evaluation(config, mesh: Mesh) -> tuple[dict[str, Any], ShardedState]:
  """(predictors, sharded state layout) for evaluating checkpoints of this config."""
  _, eval_source = make_sources(config)
  built = build(config, mesh, train=False)
  return predictors(config, built, eval_source), built.sharded


def unigram_nll(source, vocab: int, examples: int = 256) -> float:
  """Cross-entropy of the best context-free model (token frequencies of `source`)."""
  counts = np.ones(vocab)
  for i in range(min(examples, len(source))):
    counts += np.bincount(np.asarray(source[i]["tokens"]).reshape(-1), minlength=vocab)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Render-and-optimize (or full-chain) training, resuming from workdir/checkpoints.

  Stops after `config.total_steps` updates, on pre-emption, or at the first chain end after
  `config.max_train_seconds` (> 0) of wall time since this call (checkpoint and evaluation
  then as at the last step)."""
  t_start = time.time()
  validate(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  logging.info("mesh: %s", mesh_lib.describe(mesh))
  train_source, eval_source = make_sources(config)  # data/model mismatches fail before compiling
  built = build(config, mesh)
  layout = built.layout
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(layout.sharded.abstract.params))
  logging.info("nuwa_infinity: %.2fM parameters, pool %s", n_params / 1e6,
               layout.abstract_pool.shape)

  evals = eval_common.from_config(config.evals, predictors(config, built, eval_source))
  ckpt = Checkpointer(f"{workdir}/checkpoints", config.checkpoint.every_steps,
                      config.checkpoint.keep, config.checkpoint.async_save)
  state, data_state, step = ckpt.restore_or_init(layout.sharded, config.seed)
  batches = make_batches(config, train_source, mesh, data_state["batches"])
  writer = MetricWriter(workdir)
  metrics = AsyncMetrics(writer, config.total_steps, layout.tokens_per_step,
                         config.log_every_steps, first_step=step)
  preemption = PreemptionWatcher()
  last = config.total_steps if config.stop_at_step <= 0 else min(config.stop_at_step,
                                                                  config.total_steps)
  chain_steps: dict[int, Any] = {}
  pool = new_pool(built)
  last_saved, stop = step, False
  budget = float(config.get("max_train_seconds", 0) or 0)
  try:
    while step < last and not stop:
      chain = next_chain(config, batches, config.order)
      if config.mode == "full_chain":
        if chain.num_steps not in chain_steps:
          chain_steps[chain.num_steps] = compile_chain_step(config, built, chain.num_steps)
        per_step = {k: getattr(chain, k) for k in STEP_FIELDS if k not in ("text", "text_mask")}
        inputs = dict(to_global(built, per_step, leading=1),
                      **to_global(built, {"text": chain.text, "text_mask": chain.text_mask}))
        state, pool, m = chain_steps[chain.num_steps](state, pool, inputs)
        step += 1
        metrics.push(step, m)
      else:
        for i in range(chain.num_steps):
          state, pool, m = built.train_step(state, pool, to_global(built, chain.step(i)))
          step += 1
          metrics.push(step, m)
          if step >= last:
            break
      stop = preemption.should_stop(step)
      out_of_time = bool(budget) and time_is_up(t_start, budget)
      end = step >= last or out_of_time
      # Checkpoints only at chain boundaries: the pool never needs saving.
      due = step // config.checkpoint.every_steps > last_saved // config.checkpoint.every_steps
      if due or stop or end:
        ckpt.maybe_save(step, state, batches.state(), force=True)
        last_saved = step
      todo = eval_common.due(evals, step, step - chain.num_steps, end)
      if todo:
        metrics.flush()
        eval_common.run_and_write(todo, state, step, writer)
      if out_of_time and step < last:
        logging.warning("config.max_train_seconds=%g reached at step %d of %d: checkpoint "
                        "saved, stopping.", budget, step, last)
        break
    metrics.flush()
    if stop:
      logging.warning("pre-empted: checkpoint of step %d saved, exiting.", step)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return {"history": metrics.history, "last_step": step, "state": state, "built": built,
          "eval_source": eval_source, "train_source": train_source, "preempted": stop}
