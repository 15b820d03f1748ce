"""Trainer for the VQGAN tokenizer (configs/vqgan.py).

Generator (encoder, quantizer, decoder) and PatchGAN discriminator are trained together, one
update of each per step: L1 reconstruction + perceptual (LPIPS, when weights are given) +
codebook/commitment losses + adaptive-weight hinge GAN loss once `loss.disc_start` is reached.
The adaptive weight uses the gradients of the reconstruction and GAN losses with respect to the
decoder's last layer, both from one forward pass (two backward passes through `jax.vjp`).
Reconstruction grids are written as PNG at intervals; held-out PSNR / SSIM / codebook use are
logged. Sections: config checks, input, model and steps, build, evaluation, loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from nuwa_jax.config_utils import (
  ConfigError,
  check_batch_layout,
  check_choice,
  check_positive,
)
from nuwa_jax.data import datasets, transforms
from nuwa_jax.data.pipeline import HostBatchIterator, abstract_batch
from nuwa_jax.evaluators import common as eval_common
from nuwa_jax.losses import gan
from nuwa_jax.losses.perceptual import PerceptualLoss
from nuwa_jax.models import vqgan as vqgan_model
from nuwa_jax.models.quantizer import STATS
from nuwa_jax.runtime import images as image_io
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.runtime import sharding as shd
from nuwa_jax.runtime.checkpoint import Checkpointer
from nuwa_jax.runtime.metrics import AsyncMetrics, MetricWriter
from nuwa_jax.runtime.optimizer import make_schedule
from nuwa_jax.runtime.preemption import PreemptionWatcher, time_is_up
from nuwa_jax.runtime.train_state import ShardedState, TrainState, compile_step

# ----------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------

def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  check_positive(config, "config", "total_steps", "batch_size", "log_every_steps",
                 "crop_size")
  check_positive(config.model, "config.model", "ch", "num_codes", "embed_dim", "z_channels")
  check_positive(config.optimizer, "config.optimizer", "lr")
  check_choice("config.model.dtype", config.model.dtype, ("float32", "bfloat16"))
  factor = 2 ** (len(config.model.ch_mult) - 1)
  if config.crop_size % factor:
    raise ConfigError(f"config.crop_size={config.crop_size} is not a multiple of the VQGAN "
                      f"factor {factor} (len(config.model.ch_mult)={len(config.model.ch_mult)}).")
  for spec in config.data.datasets.split(","):
    name = spec.split(":")[0]
    if name not in datasets.BUILDERS:
      raise ConfigError(f"config.data.datasets: unknown dataset {name!r}; known: "
                        f"{sorted(datasets.BUILDERS)}.")
  parse_weights(config)
  if config.loss.perceptual_weights and not os.path.isfile(config.loss.perceptual_weights):
    raise ConfigError(f"config.loss.perceptual_weights={config.loss.perceptual_weights!r}: no "
                      "such file (convert published weights with nuwa_jax.tools.convert_lpips).")
  check_batch_layout(config, num_devices, num_processes)


# ----------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------

class ConcatSource:
  """Several random-access sources one after another."""

  def __init__(self, sources):
    self.sources = [s for s in sources if len(s)]
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self):
    return int(self.offsets[-1])

  def __getitem__(self, index):
    i = int(np.searchsorted(self.offsets, index, side="right") - 1)
    return self.sources[i][index - int(self.offsets[i])]


def dataset_builders(config) -> list:
  """Builders of `config.data.datasets` ('name[:config]' comma-separated)."""
  out = []
  for spec in config.data.datasets.split(","):
    name, _, cfg = spec.partition(":")
    params = {"folder": config.data.folder} if name in ("image_folder", "captioned_images") \
        else {}
    out.append(datasets.get_builder(name, config.data.data_dir or None, config=cfg or None,
                                    **params))
  return out


def dataset_names(config) -> list[str]:
  """Short names of `config.data.datasets` ('sample_media', 'synthetic_scenes', ...)."""
  return [spec.split(":")[0] for spec in config.data.datasets.split(",")]


def parse_weights(config) -> list[float] | None:
  """`config.data.weights` ('' or one positive number per dataset) as floats, or None."""
  text = str(config.data.get("weights", "") or "").strip()
  if not text:
    return None
  try:
    weights = [float(w) for w in text.split(",")]
  except ValueError:
    raise ConfigError(f"config.data.weights={text!r}: expected comma-separated numbers, one "
                      "per dataset.") from None
  n = len(config.data.datasets.split(","))
  if len(weights) != n or min(weights) <= 0:
    raise ConfigError(f"config.data.weights={text!r}: expected {n} positive numbers (one per "
                      f"dataset of config.data.datasets={config.data.datasets!r}).")
  return weights


def repeats(sizes: list[int], crops_per_image: int, weights: list[float] | None) -> list[int]:
  """Times each dataset's images are repeated in the training stream.

  Without weights every image gives `crops_per_image` crops (datasets count by their size).
  With weights, dataset i gets a share weights[i] / sum(weights) of the stream: the largest
  (in crops per unit of weight) keeps `crops_per_image` per image and the others are repeated
  more, so 10 photos can stand beside 2000 synthetic scenes.
  """
  if weights is None:
    return [crops_per_image] * len(sizes)
  per_weight = max(n * crops_per_image / w for n, w in zip(sizes, weights) if n)
  return [max(1, round(per_weight * w / n)) if n else 1 for n, w in zip(sizes, weights)]


def make_sources(config):
  """Train source (each image repeated, see `repeats`) and held-out source (the datasets'
  test splits one after another)."""
  train, test = make_split_sources(config)
  return train, ConcatSource([t for t in test.values()])


def make_split_sources(config):
  """(train source, {dataset name: test source}) of `config.data.datasets`."""
  builders = dataset_builders(config)
  datasets.ensure_built(builders)
  sources = [datasets.data_source(b, "train") for b in builders]
  times = repeats([len(s) for s in sources], config.data.crops_per_image, parse_weights(config))
  train = ConcatSource([transforms.RepeatedSource(s, t) for s, t in zip(sources, times)])
  test = {name: datasets.data_source(b, "test") for name, b in zip(dataset_names(config),
                                                                   builders)
          if "test" in b.info.splits}
  return train, test


def crops(config, seed_offset: int = 0) -> transforms.ImageCrops:
  return transforms.ImageCrops(((1, 1),), config.crop_size, config.seed + seed_offset,
                               max_scale=config.data.max_scale, flip=config.data.flip)


# ----------------------------------------------------------------------------------------
# Model and steps
# ----------------------------------------------------------------------------------------

class QuickInitState(ShardedState):
  """ShardedState whose `init` is compiled at XLA:CPU/GPU optimisation level 0.

  The init function runs once; at the default level XLA:CPU spends ~3x longer compiling the
  threefry initializers than at level 0 (about 39 s vs 14 s for the tiny config with other
  jobs on the machine), which matters for a tokenizer trained in a few minutes.
  """

  def init(self, rng: jax.Array) -> TrainState:
    with shd.activation_sharding(self.mesh, self.rules):
      fn = jax.jit(lambda r: nn.meta.unbox(self._init_boxed(r)), out_shardings=self.shardings)
      lowered = fn.lower(rng)
      options = ({"xla_backend_optimization_level": 0}
                 if jax.default_backend() in ("cpu", "gpu") else None)
      return lowered.compile(compiler_options=options)(rng)


@dataclasses.dataclass
class Layout:
  model: Any
  disc: Any
  tx: Any
  schedule: Any
  sharded: ShardedState
  abstract_batch: Any
  tokens_per_step: int

  def train_args(self) -> tuple:
    return self.sharded.abstract, self.abstract_batch


def make_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> Layout:
  model = vqgan_model.VQGAN(**config.model)
  disc = gan.NLayerDiscriminator(**config.disc)
  size = config.crop_size
  example = {"image": np.zeros((size, size, 3), np.float32)}
  batch_spec = abstract_batch(example, config.batch_size,
                              shd.logical_sharding(("batch",), mesh, config.sharding.rules))
  schedule = make_schedule(config.optimizer, config.total_steps)
  opt = lambda: optax.chain(
      optax.clip_by_global_norm(config.optimizer.grad_clip),
      optax.adam(schedule, b1=config.optimizer.b1, b2=config.optimizer.b2))
  tx = optax.multi_transform({"gen": opt(), "disc": opt()}, {"gen": "gen", "disc": "disc"})
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)

  def init_params(rng):
    gen_rng, disc_rng = jax.random.split(rng)
    return {"gen": model.init(gen_rng, dummy)["params"],
            "disc": disc.init(disc_rng, dummy)["params"]}

  def init_extra(rng):
    return model.init(jax.random.split(rng)[0], dummy).get(STATS, {})

  sharded = QuickInitState(init_params, tx, mesh, config.sharding.rules, init_extra)
  sharded.check(config.sharding.max_replicated_size)
  f = model.factor
  return Layout(model, disc, tx, schedule, sharded, batch_spec,
                config.batch_size * (size // f) ** 2)


def uses_gan(config: ml_collections.ConfigDict) -> bool:
  """Whether the GAN term can ever be on in this run (disc_weight > 0 and disc_start reached
  before total_steps). When not, the step leaves the discriminator out entirely."""
  return config.loss.disc_weight > 0 and config.loss.disc_start < config.total_steps


def make_train_fn(config: ml_collections.ConfigDict, layout: Layout, perceptual=None):
  """`(state, batch) -> (state, metrics)`: one generator and one discriminator update.

  One forward pass of the generator and ONE full backward pass: the losses are functions of
  the reconstruction, so the generator's gradient is the VJP of the combined cotangent
  d(nll)/d(recon) + d_weight * d(g_loss)/d(recon). The adaptive weight needs the two
  gradients w.r.t. the decoder's last kernel only: they come from the same VJP function, and
  XLA drops everything of those two extra backward passes but the last layer.
  Without the GAN (`uses_gan` false) the discriminator is neither run nor updated.
  """
  model, disc, tx = layout.model, layout.disc, layout.tx
  perceptual = perceptual or PerceptualLoss(None)
  loss_cfg = config.loss
  last = vqgan_model.last_layer_path()
  gan_on = uses_gan(config)

  def step(state: TrainState, batch, lpips_params=None):
    images = batch["image"]
    gen, dparams = state.params["gen"], state.params["disc"]
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def forward(gen_params):
      (recon, aux), new_stats = model.apply({"params": gen_params, STATS: state.extra}, images,
                                            train=True, mutable=[STATS], rngs={"vq": rng})
      return (recon, aux["quant_loss"]), (aux, new_stats)

    (recon, q_loss), vjp, (aux, new_stats) = jax.vjp(forward, gen, has_aux=True)

    def nll_fn(recon):
      rec = jnp.mean(jnp.abs(images - recon))
      perc = perceptual(images, recon, lpips_params) if perceptual.enabled else 0.0
      return loss_cfg.rec_weight * rec + loss_cfg.perceptual_weight * perc, (rec, perc)

    (nll, (rec, perc)), c_nll = jax.value_and_grad(nll_fn, has_aux=True)(recon)
    zero_q = jnp.zeros_like(q_loss)
    metrics = {}
    if gan_on:
      disc_factor = gan.adopt_weight(1.0, state.step, loss_cfg.disc_start)
      g_loss, c_g = jax.value_and_grad(
          lambda r: gan.generator_loss(disc.apply({"params": dparams}, r)))(recon)
      last_grad = lambda c: gan.get_path(vjp((c, zero_q))[0], last)
      d_weight = gan.adaptive_weight(last_grad(c_nll), last_grad(c_g),
                                     loss_cfg.disc_weight) * disc_factor
      c_recon = c_nll + d_weight * c_g

      def disc_loss(d):
        real = disc.apply({"params": d}, images)
        fake = disc.apply({"params": d}, jax.lax.stop_gradient(recon))
        loss = gan.hinge_d_loss(real, fake)
        if loss_cfg.r1_gamma:
          loss = loss + 0.5 * loss_cfg.r1_gamma * gan.r1_penalty(
              lambda x: disc.apply({"params": d}, x), images)
        return disc_factor * loss, (jnp.mean(real), jnp.mean(fake))

      (d_loss, (real_logit, fake_logit)), grad_disc = jax.value_and_grad(
          disc_loss, has_aux=True)(dparams)
      metrics.update(g_loss=g_loss, d_loss=d_loss, d_weight=d_weight, logits_real=real_logit,
                     logits_fake=fake_logit)
    else:
      g_loss = d_weight = jnp.zeros((), jnp.float32)
      c_recon = c_nll
      grad_disc = jax.tree.map(jnp.zeros_like, dparams)
    (grad_gen,) = vjp((c_recon, jnp.ones_like(q_loss) * loss_cfg.codebook_weight))
    grads = {"gen": grad_gen, "disc": grad_disc}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    mse = jnp.mean(jnp.square((jnp.clip(recon, -1, 1) - images) / 2.0), axis=(1, 2, 3))
    metrics.update(loss=nll + d_weight * g_loss + loss_cfg.codebook_weight * q_loss,
                   rec_loss=rec, perceptual_loss=perc, quant_loss=q_loss,
                   psnr=jnp.mean(-10.0 * jnp.log10(mse + 1e-10)),
                   lr=layout.schedule(state.step),
                   **{f"vq_{k}": v for k, v in aux["stats"].items()})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      extra=new_stats[STATS]), metrics

  return step


# ----------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
  layout: Layout
  train_step: Any
  reconstruct: Any  # jitted (gen params, stats, images) -> (recon, indices)
  perceptual: PerceptualLoss
  mesh: Mesh

  @property
  def sharded(self) -> ShardedState:
    return self.layout.sharded


def build(config: ml_collections.ConfigDict, mesh: Mesh, train: bool = True) -> Built:
  """Layout, the compiled train step (train=False: None, for evaluation) and reconstruct."""
  layout = make_layout(config, mesh)
  perceptual = PerceptualLoss(config.loss.perceptual_weights or None)
  if not perceptual.enabled:
    logging.info("vqgan: no config.loss.perceptual_weights given: the perceptual loss is off.")
  train_fn = make_train_fn(config, layout, perceptual)
  if perceptual.enabled:
    lpips = jax.device_put(perceptual.params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    fn = lambda state, batch: train_fn(state, batch, lpips)
  else:
    fn = train_fn
  train_step = compile_step(fn, layout.sharded, layout.abstract_batch) if train else None
  model = layout.model

  @jax.jit
  def reconstruct(gen_params, stats, images):
    recon, aux = model.apply({"params": gen_params, STATS: stats}, images)
    return jnp.clip(recon, -1, 1), aux["indices"]

  return Built(layout, train_step, reconstruct, perceptual, mesh)


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

def held_out_crops(config, source, count: int) -> np.ndarray:
  """`count` fixed crops (float [-1, 1]) of the held-out images."""
  crop = crops(config, seed_offset=10_000)
  reps = transforms.RepeatedSource(source, max(1, math.ceil(count / max(len(source), 1))))
  return np.stack([crop(reps[i], i, 0)["image"] for i in range(count)])


def held_out_sets(config, test_sources: dict) -> dict[str, np.ndarray]:
  """{dataset name: `config.data.held_out_crops` fixed held-out crops} (scored apart)."""
  # Runs written before data.held_out_crops kept the count in eval.crops.
  count = config.data.get("held_out_crops", (config.get("eval") or {}).get("crops", 32))
  return {name: held_out_crops(config, src, count)
          for name, src in test_sources.items() if len(src)}


def reconstructor(config, built: Built):
  """`reconstruct(state, images) -> (reconstructions, code indices)` in fixed-size batches
  (one compiled shape)."""
  b = config.batch_size

  def reconstruct(state, images):
    recon, indices = [], []
    for i in range(0, len(images), b):
      chunk = images[i:i + b]
      n = len(chunk)
      if n < b:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, 0)])
      r, idx = built.reconstruct(state.params["gen"], state.extra, chunk)
      recon.append(np.asarray(r)[:n])
      indices.append(np.asarray(idx)[:n])
    return np.concatenate(recon), np.concatenate(indices)
  return reconstruct


def predictors(config, built: Built, held_out: dict[str, np.ndarray]) -> dict[str, Any]:
  """What the evaluators of `config.evals` may use (nuwa_jax/evaluators/common.py)."""
  return {"reconstruct": reconstructor(config, built), "held_out": held_out,
          "num_codes": int(config.model.num_codes)}


def make_evaluation(config, mesh: Mesh) -> tuple[dict[str, Any], ShardedState]:
  """(predictors, sharded state layout) for evaluating checkpoints of this config."""
  _, test_sources = make_split_sources(config)
  built = build(config, mesh, train=False)
  return predictors(config, built, held_out_sets(config, test_sources)), built.sharded


def recon_grid(held_out: dict[str, np.ndarray], recon: dict[str, np.ndarray],
               per_row: int = 8) -> np.ndarray:
  """Originals above their reconstructions, two rows per dataset."""
  rows = []
  for name, imgs in held_out.items():
    n = min(per_row, len(imgs))
    rows += [imgs[:n], recon[name][:n]]
  return image_io.grid(rows)


# ----------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  validate(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  logging.info("mesh: %s", mesh_lib.describe(mesh))
  t_start = time.time()
  train_source, test_sources = make_split_sources(config)
  built = build(config, mesh)
  layout = built.layout
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(layout.sharded.abstract.params))
  logging.info("vqgan: %.2fM parameters (with discriminator), f=%d, %d codes", n_params / 1e6,
               layout.model.factor, config.model.num_codes)

  ckpt = Checkpointer(f"{workdir}/checkpoints", config.checkpoint.every_steps,
                      config.checkpoint.keep, config.checkpoint.async_save)
  state, data_state, start = ckpt.restore_or_init(layout.sharded, config.seed)
  batches = HostBatchIterator(train_source, config.batch_size, shd.logical_sharding(
      ("batch",), mesh, config.sharding.rules), seed=config.seed,
                              start_batch=data_state["batches"], transform=crops(config))
  held_out = held_out_sets(config, test_sources)
  evals = eval_common.from_config(config.evals, predictors(config, built, held_out))
  writer = MetricWriter(workdir)
  metrics = AsyncMetrics(writer, config.total_steps, layout.tokens_per_step,
                         config.log_every_steps, first_step=start)
  preemption = PreemptionWatcher()
  last = config.total_steps if config.stop_at_step <= 0 else min(config.stop_at_step,
                                                                  config.total_steps)
  budget = float(config.get("max_train_seconds", 0) or 0)
  step, scores, stop = start, {}, False
  try:
    for step in range(start + 1, last + 1):
      state, m = built.train_step(state, next(batches))
      metrics.push(step, m)
      stop = preemption.should_stop(step)
      out_of_time = bool(budget) and step % config.log_every_steps == 0 and time_is_up(
          t_start, budget)
      end = step == last or out_of_time
      ckpt.maybe_save(step, state, batches.state(), force=stop or end)
      todo = eval_common.due(evals, step, step - 1, end)
      if todo:
        metrics.flush()
        scores = eval_common.run_and_write(todo, state, step, writer)
        writer.write(step, {"wall_seconds": time.time() - t_start})
        for e in todo:
          recon = getattr(e.evaluator, "last_reconstructions", None)
          if recon and jax.process_index() == 0:
            image_io.save_png(os.path.join(workdir, f"recon_{step:06d}.png"),
                              recon_grid(held_out, recon))
      if stop:
        logging.warning("pre-empted: checkpoint of step %d saved, exiting.", step)
        break
      if out_of_time:
        logging.warning("config.max_train_seconds=%g reached at step %d of %d: checkpoint "
                        "saved, stopping.", budget, step, last)
        break
    metrics.flush()
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return {"history": metrics.history, "last_step": step, "state": state, "built": built,
          "scores": scores, "preempted": bool(stop)}


def load(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None):
  """(model, gen params, stats) of the latest checkpoint in `workdir` (for encode/decode)."""
  mesh = mesh or mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  layout = make_layout(config, mesh)
  ckpt = Checkpointer(f"{workdir}/checkpoints", 1, 1, async_save=False)
  try:
    state, _, _ = ckpt.restore(layout.sharded.abstract)
  finally:
    ckpt.close()
  return layout.model, state.params["gen"], state.extra
