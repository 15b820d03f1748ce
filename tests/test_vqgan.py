"""VQGAN tokenizer: model shapes, quantizer maths, losses, LPIPS converter, sharded apply."""

import functools
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs.baseline import DEFAULT_RULES
from nuwa_jax.losses import gan, perceptual
from nuwa_jax.models import vqgan
from nuwa_jax.models.quantizer import STATS, VectorQuantizer, restart_dead_codes
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.runtime import sharding as shd
from nuwa_jax.tools import convert_lpips

from conftest import save_state

TINY = {"ch": 16, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,),
        "resolution": 16, "z_channels": 16, "embed_dim": 8, "num_codes": 32}


def images(n=4, size=16, seed=0):
  """Smooth random images in [-1, 1] (low-frequency, so a tiny model can fit them)."""
  coarse = np.random.default_rng(seed).uniform(-1, 1, (n, size // 4, size // 4, 3))
  return jnp.asarray(coarse.repeat(4, 1).repeat(4, 2), jnp.float32)


# Threefry keys make XLA:CPU compile every initializer for ~2 s; rbg keys compile quickly.
def key(seed):
  return jax.random.key(seed, impl="rbg")


def fast_jit(fn, *args):
  """jit + compile at XLA:CPU optimisation level 0: these tests compile more than they run."""
  return jax.jit(fn).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})


def run(fn, *args):
  return fast_jit(fn, *args)(*args)


@pytest.fixture(scope="module")
def tiny():
  """(model, variables) of the tiny config, initialised once for the module."""
  model = vqgan.VQGAN(**TINY)
  return model, nn.unbox(run(model.init, key(0), images(1)))


def test_encode_decode_shapes_and_round_trip(tiny):
  model, variables = tiny
  x = images(2)
  video = jnp.stack([x, x[::-1]], axis=1)  # [2, T=2, H, W, 3]

  def everything(variables, x, video):
    apply = lambda *a, **kw: model.apply(variables, *a, **kw)
    z_q, idx, loss, stats = apply(x, method=model.encode)
    from_codes = apply(z_q, method=model.decode)
    from_indices = apply(idx, method=model.decode_indices)
    recon, aux = apply(x)
    _, vidx, _, _ = apply(video, method=model.encode_video)
    frames = apply(vidx, method=model.decode_video_indices)
    return z_q, idx, loss, stats, from_codes, from_indices, recon, aux, vidx, frames

  (z_q, idx, loss, stats, from_codes, from_indices, recon, aux, vidx,
   frames) = run(everything, variables, x, video)
  assert z_q.shape == (2, 8, 8, 8) and idx.shape == (2, 8, 8) and idx.dtype == jnp.int32
  assert loss.shape == () and set(stats) == {"usage", "perplexity", "commitment", "dead_codes"}
  assert from_codes.shape == x.shape and from_codes.dtype == jnp.float32
  np.testing.assert_allclose(from_indices, from_codes, atol=1e-5)
  np.testing.assert_allclose(recon, from_codes, atol=1e-5)
  np.testing.assert_array_equal(aux["indices"], idx)
  # Video: frame by frame through the batch.
  assert vidx.shape == (2, 2, 8, 8)
  np.testing.assert_array_equal(vidx[:, 0], idx)
  assert frames.shape == (2, 2, 16, 16, 3)
  np.testing.assert_allclose(frames[:, 0], from_indices, atol=1e-5)
  with pytest.raises(ValueError, match="multiples of 2"):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 15, 16, 3)), method=model.encode),
                   variables)


def test_norm_and_phase_upsampling_match_their_plain_definitions():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(100.0, 3.0, (2, 6, 5, 64)), jnp.float32)  # |mean| >> std
  norm = vqgan.Norm("group")
  y = run(norm.apply, run(norm.init, key(0), x), x)
  g = np.asarray(x, np.float64).reshape(2, 6, 5, 32, 2)
  want = ((g - g.mean((1, 2, 4), keepdims=True)) /
          np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6)).reshape(x.shape)
  np.testing.assert_allclose(y, want, atol=2e-5)
  # Four 2x2 phase convs == nearest upsampling followed by the 3x3 conv, same parameters.
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 8)), jnp.float32)
  up = vqgan.Upsample(6)
  params = nn.unbox(run(up.init, key(1), x))
  params["params"]["bias"] = jnp.arange(6.0)
  plain = lambda p, x: vqgan.conv(6).apply(p, vqgan.upsample_nearest(x))
  np.testing.assert_allclose(run(up.apply, params, x), run(plain, params, x), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(tiny):
  model, variables = tiny
  bf16 = vqgan.VQGAN(**TINY, dtype="bfloat16")
  shapes = jax.eval_shape(bf16.init, key(0), images(1))["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(shapes)))
  idx = jnp.arange(2 * 8 * 8).reshape(2, 8, 8) % TINY["num_codes"]
  decode = lambda m: lambda v, i: m.apply(v, i, method=m.decode_indices)
  got, want = run(decode(bf16), variables, idx), run(decode(model), variables, idx)
  assert got.dtype == jnp.float32
  assert float(jnp.mean(jnp.abs(got - want))) < 0.05 * float(jnp.mean(jnp.abs(want)))


def test_straight_through_gradient_and_commitment_loss():
  q = VectorQuantizer(num_codes=16, code_dim=4, beta=0.25)
  z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)), jnp.float32)
  variables = run(q.init, key(0), z)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=z.shape), jnp.float32)
  f = lambda zq: jnp.sum(jnp.sin(zq) * weights)

  def everything(variables, z):
    z_q, idx, loss, _ = q.apply(variables, z)
    grad_z = jax.grad(lambda z: f(q.apply(variables, z)[0]))(z)
    grad_p = jax.grad(lambda v: q.apply(v, z)[2])(variables)["params"]["codebook"]
    return z_q, idx, loss, grad_z, jax.grad(f)(z_q), grad_p

  z_q, idx, loss, grad_z, grad_at_zq, grad_p = run(everything, variables, z)
  np.testing.assert_allclose(grad_z, grad_at_zq, rtol=1e-6)
  # Hand computation: nearest code by Euclidean distance, (1 + beta) * mean squared error.
  book = np.asarray(nn.unbox(variables["params"])["codebook"])
  flat = np.asarray(z).reshape(-1, 4)
  want = np.argmin(((flat[:, None] - book[None]) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(np.asarray(idx).reshape(-1), want)
  np.testing.assert_allclose(z_q, book[want].reshape(z.shape), atol=1e-6)
  np.testing.assert_allclose(loss, 1.25 * np.mean((flat - book[want]) ** 2), rtol=1e-5)
  # Gradient of the loss w.r.t. the codebook: 2 (e - z) / n summed per code.
  want_grad = np.zeros_like(book)
  np.add.at(want_grad, want, 2 * (book[want] - flat) / flat.size)
  np.testing.assert_allclose(nn.unbox(grad_p), want_grad, atol=1e-6)


def test_usage_and_perplexity():
  q = VectorQuantizer(num_codes=4, code_dim=2)
  book = jnp.array([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
  z = jnp.array([[1.0, 0], [1, 0], [0, 1], [0, 1]])  # codes 0, 0, 1, 1
  _, _, _, stats = jax.jit(q.apply)(
      {"params": {"codebook": book}, STATS: {"usage": jnp.zeros(4)}}, z)
  np.testing.assert_allclose(stats["usage"], 0.5)
  np.testing.assert_allclose(stats["perplexity"], 2.0, rtol=1e-6)


def test_ema_moves_used_codes_to_the_batch_mean_and_keeps_the_others():
  q = VectorQuantizer(num_codes=4, code_dim=2, ema=True, ema_decay=0.9)
  book = jnp.array([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
  stats = {"codebook": book, "cluster_size": jnp.ones(4), "embed_sum": book,
           "usage": jnp.zeros(4)}
  z = jnp.array([[2.0, 0.5], [1.5, -0.5], [0.2, 2.0]])  # codes 0, 0, 1
  (_, idx, loss, _), new = jax.jit(functools.partial(q.apply, train=True, mutable=[STATS]))(
      {STATS: stats}, z)
  np.testing.assert_array_equal(idx, [0, 0, 1])
  np.testing.assert_allclose(loss, 0.25 * np.mean((z - book[idx]) ** 2), rtol=1e-6)
  new_book = np.asarray(new[STATS]["codebook"])
  for k, rows in ((0, [0, 1]), (1, [2])):
    mean = np.asarray(z)[rows].mean(0)
    assert np.linalg.norm(new_book[k] - mean) < np.linalg.norm(book[k] - mean)
    cluster = 0.9 + 0.1 * len(rows)
    embed = 0.9 * np.asarray(book[k]) + 0.1 * np.asarray(z)[rows].sum(0)
    np.testing.assert_allclose(new_book[k], embed / cluster, rtol=1e-3)
  np.testing.assert_array_equal(new_book[2:], book[2:])
  np.testing.assert_allclose(new[STATS]["usage"], [0.2, 0.1, 0, 0], rtol=1e-6)
  # Without train=True (or a mutable collection) nothing changes.
  _, same = jax.jit(functools.partial(q.apply, mutable=[STATS]))({STATS: stats}, z)
  np.testing.assert_array_equal(same[STATS]["codebook"], book)


def test_dead_code_restart_replaces_unused_codes_with_encoder_outputs():
  q = VectorQuantizer(num_codes=6, code_dim=3, ema=True, restart_threshold=0.5)
  book = jnp.eye(6, 3) * 5.0
  usage = jnp.array([10.0, 10.0, 0, 0, 0, 0])  # codes 0 and 1 alive
  stats = {"codebook": book, "cluster_size": jnp.ones(6), "embed_sum": book, "usage": usage}
  # Every row is nearest to code 0.
  z = jnp.asarray(np.random.default_rng(3).normal(0, 0.5, (16, 3)) + [5.0, 0, 0], jnp.float32)

  apply = jax.jit(functools.partial(q.apply, train=True, mutable=[STATS]))

  def step(seed):
    out, new = apply({STATS: stats}, z, rngs={"vq": key(seed)})
    return out, np.asarray(new[STATS]["codebook"]), new[STATS]

  (_, idx, _, st), new_book, new_stats = step(0)
  assert set(np.asarray(idx).tolist()) == {0}
  np.testing.assert_array_equal(new_book[1], book[1])  # alive, unused: untouched
  rows = {tuple(r) for r in np.asarray(z).round(5)}
  assert all(tuple(r) in rows for r in new_book[2:].round(5))  # dead: batch vectors
  assert float(st["dead_codes"]) == 4
  np.testing.assert_allclose(new_stats["usage"][2:], 0.5)
  np.testing.assert_array_equal(step(0)[1], new_book)  # same rng, same replacements
  assert not np.array_equal(step(1)[1][2:], new_book[2:])
  # The pure function for a trainable codebook.
  replaced, dead = restart_dead_codes(book, usage, z, key(0), 0.5)
  np.testing.assert_array_equal(dead, [False, False, True, True, True, True])
  np.testing.assert_array_equal(replaced[:2], book[:2])
  with pytest.raises(ValueError, match="needs ema=True"):
    VectorQuantizer(num_codes=4, code_dim=2, restart_threshold=1.0).init(
        key(0), jnp.zeros((1, 2)))


def test_l2_lookup_picks_by_cosine():
  book = jnp.array([[10.0, 0.0], [0.1, 0.1]])
  z = jnp.array([[8.0, 5.0]])  # Euclidean: code 0; cosine: code 1 (45 degrees)
  plain = VectorQuantizer(num_codes=2, code_dim=2)
  cosine = VectorQuantizer(num_codes=2, code_dim=2, l2_codes=True)
  v = {"params": {"codebook": book}, STATS: {"usage": jnp.zeros(2)}}
  assert int(jax.jit(plain.apply)(v, z)[1][0]) == 0
  z_q, idx, _, _ = jax.jit(cosine.apply)(v, z)
  assert int(idx[0]) == 1
  np.testing.assert_allclose(z_q, [[2 ** -0.5, 2 ** -0.5]], rtol=1e-5)


def test_a_few_adam_steps_lower_the_reconstruction_loss(tiny):
  model, variables = tiny
  params = variables["params"]
  x = images(4, seed=5)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(params):
    recon, aux = model.apply({**variables, "params": params}, x)
    rec = jnp.mean(jnp.abs(recon - x))
    return rec + aux["quant_loss"], rec

  def step(params, opt):
    (_, rec), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, rec

  step = fast_jit(step, params, opt)
  recs = []
  for _ in range(15):
    params, opt, rec = step(params, opt)
    recs.append(float(rec))
  assert recs[-1] < 0.7 * recs[0], recs


def test_adaptive_weight_matches_a_direct_computation(tiny):
  model, variables = tiny
  params = variables["params"]
  disc = gan.NLayerDiscriminator(ndf=8, n_layers=2, groups=4)
  x = images(2)
  dparams = run(disc.init, key(1), x)
  recon = lambda p: model.apply({**variables, "params": p}, x)[0]
  nll = lambda p: jnp.mean(jnp.abs(recon(p) - x))
  g = lambda p: gan.generator_loss(disc.apply(dparams, recon(p)))
  path = vqgan.last_layer_path()

  def both(params):
    got = gan.last_layer_adaptive_weight(nll, g, params, path, disc_weight=0.8)
    g_nll = gan.get_path(jax.grad(nll)(params), path)
    g_g = gan.get_path(jax.grad(g)(params), path)
    return got, jnp.linalg.norm(g_nll), jnp.linalg.norm(g_g)

  got, n_nll, n_g = run(both, params)
  want = 0.8 * np.clip(n_nll / (n_g + 1e-4), 0, 1e4)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert gan.get_path(params, path).shape == (3, 3, 16, 3)
  assert float(gan.adaptive_weight(jnp.ones(4), jnp.zeros(4))) == 1e4  # clipped


def test_discriminator_and_hinge_losses():
  disc = gan.NLayerDiscriminator(ndf=8, n_layers=3, groups=4)
  x = images(2, size=32)
  dparams = run(disc.init, key(0), x)
  assert run(disc.apply, dparams, x).shape == (2, 2, 2, 1)  # 32/8 - 2
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
  np.testing.assert_allclose(gan.hinge_d_loss(real, fake), 0.5 * (0.25 + 0.75))
  np.testing.assert_allclose(gan.generator_loss(fake), 0.75)
  np.testing.assert_allclose(gan.vanilla_d_loss(real, fake),
                             0.5 * np.mean(np.log1p(np.exp([-2.0, -0.5]))) +
                             0.5 * np.mean(np.log1p(np.exp([-2.0, 0.5]))), rtol=1e-6)
  assert float(gan.adopt_weight(1.0, 9, start=10)) == 0.0
  assert float(gan.adopt_weight(1.0, 10, start=10)) == 1.0
  w = jnp.asarray(np.random.default_rng(4).normal(size=(1, 4, 4, 3)), jnp.float32)
  linear = lambda imgs: jnp.sum(imgs * w, axis=(1, 2, 3))
  np.testing.assert_allclose(gan.r1_penalty(linear, jnp.zeros((3, 4, 4, 3))),
                             jnp.sum(w * w), rtol=1e-5)


WIDTHS = (4, 8, 8, 16, 16)


def torch_style_weights(seed=0, widths=WIDTHS):
  """Random arrays named and shaped like torchvision vgg16 + LPIPS heads (OIHW)."""
  rng = np.random.default_rng(seed)
  vgg, lin = {}, {}
  for j, i in enumerate(convert_lpips.VGG16_CONV_INDICES):
    k = perceptual.expected_shapes(widths)[f"vgg/conv{j}/kernel"]
    vgg[f"features.{i}.weight"] = rng.normal(0, 0.3, (k[3], k[2], 3, 3)).astype(np.float32)
    vgg[f"features.{i}.bias"] = rng.normal(0, 0.1, k[3]).astype(np.float32)
  vgg["classifier.0.weight"] = np.zeros((2, 2), np.float32)  # ignored
  for l, c in enumerate(widths):
    lin[f"lin{l}.model.1.weight"] = rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
  return vgg, lin


def test_lpips_converter_and_perceptual_loss(tmp_path):
  vgg, lin = torch_style_weights()
  np.savez(tmp_path / "vgg.npz", **vgg)
  with open(tmp_path / "lin.pkl", "wb") as f:
    pickle.dump(lin, f)
  out = str(tmp_path / "lpips.npz")
  assert convert_lpips.main(["--vgg", str(tmp_path / "vgg.npz"), "--lin",
                             str(tmp_path / "lin.pkl"), "--out", out]) == 0
  with np.load(out) as f:
    np.testing.assert_array_equal(f["vgg/conv2/kernel"],
                                  vgg["features.5.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(f["lin/4/kernel"], lin["lin4.model.1.weight"].reshape(-1))
    assert str(f["meta/format"]) == perceptual.FORMAT

  loss = perceptual.PerceptualLoss(out)
  assert loss.enabled
  x, y = images(2, size=32, seed=1), images(2, size=32, seed=2)
  same, d, mean = run(lambda p: (loss.distance(x, x, p), loss.distance(x, y, p), loss(x, y, p)),
                      loss.params)
  np.testing.assert_allclose(same, 0.0, atol=1e-9)  # exactly 0 on one CPU, 4e-14 on another
  assert d.shape == (2,) and bool(jnp.all(d > 0))
  np.testing.assert_allclose(mean, d.mean(), rtol=1e-6)
  off = perceptual.PerceptualLoss(None)
  assert not off.enabled and float(off(x, y)) == 0.0

  del vgg["features.28.bias"]
  with pytest.raises(ValueError, match=r"features\.\[28\]"):
    convert_lpips.convert(vgg, lin)
  vgg, lin = torch_style_weights()
  lin["lin2.model.1.weight"] = np.zeros((1, 3, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"lin/2/kernel: shape \(3,\), expected \(8,\)"):
    convert_lpips.convert(vgg, lin)
  assert perceptual.expected_shapes()["vgg/conv12/kernel"] == (3, 3, 512, 512)


def test_sharded_apply_matches_single_device(tiny):
  model, single_vars = tiny
  x = images(8)
  mesh = mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = tuple(DEFAULT_RULES) + vqgan.LOGICAL_RULES
  abstract = jax.eval_shape(model.init, key(0), x[:1])
  shardings = shd.tree_shardings(abstract, mesh, rules)
  params_sh = shardings["params"]
  assert params_sh["decoder"]["up_1_block_0"]["conv1"]["kernel"].spec == P(
      None, None, None, "fsdp")
  assert params_sh["decoder"]["conv_out"]["kernel"].is_fully_replicated
  assert params_sh["quantizer"]["codebook"].spec == P("tensor", "fsdp")
  sharded_vars = jax.device_put(single_vars, shardings)
  batch_sh = shd.logical_sharding(("batch", None, None, None), mesh, rules)

  def apply_sharded(variables, images):
    with shd.activation_sharding(mesh, rules):
      return model.apply(variables, images)

  recon, aux = run(apply_sharded, sharded_vars, jax.device_put(x, batch_sh))
  want, want_aux = run(model.apply, single_vars, x)
  assert recon.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(recon, want, atol=2e-5)
  np.testing.assert_array_equal(aux["indices"], want_aux["indices"])


# ----------------------------------------------------------------------------------------
# Commands: python -m nuwa_jax.tools.vqgan encode|decode
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A tiny random-init tokenizer saved like a trained one (config.json + checkpoint).

  Local decoder (per-pixel norms, no attention): tiled decoding must equal whole decoding.
  """

  from configs import vqgan as vqgan_config
  from nuwa_jax.trainers import vqgan as trainer
  workdir = str(tmp_path_factory.mktemp("tokenizer"))
  config = vqgan_config.get_config("size=tiny")
  config.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=0, z_channels=8, embed_dim=8,
                      num_codes=32, norm="pixel", mid_attention=False)
  config.disc.ndf = 8
  config.crop_size = 16
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  layout = trainer.make_layout(config, mesh)
  state = layout.sharded.init(key(0))
  save_state(state, config, workdir)
  return workdir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  from nuwa_jax.tools import vqgan as tool
  return tool.Tokenizer(tokenizer_dir)


def run_command(argv):
  """The command line in-process with fresh flag values: (0, output path) or (2, error)."""
  from absl import flags

  from nuwa_jax.tools import vqgan as tool
  flags.FLAGS.unparse_flags()
  try:
    return 0, tool.run(flags.FLAGS(["vqgan"] + list(argv)))
  except tool.CommandError as e:
    return 2, str(e)


def test_encode_decode_commands_images_video_and_tiles(tokenizer_dir, tokenizer, tmp_path):
  import os

  import av
  from PIL import Image

  from nuwa_jax.config_utils import load_json
  from nuwa_jax.data import pretokenize
  from nuwa_jax.tools import vqgan as tool
  from nuwa_jax.trainers import vqgan as trainer
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (48, 60, 3), np.uint8).repeat(2, 0).repeat(2, 1)  # 96 x 120
  Image.fromarray(photo).save(tmp_path / "photo.png")
  (tmp_path / "folder").mkdir()
  for i in range(2):
    Image.fromarray(photo[:, i:i + 32]).save(tmp_path / "folder" / f"{i}.png")
  video = tmp_path / "clip.mp4"
  with av.open(str(video), "w") as out:
    stream = out.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
    for t in range(5):
      frame = np.roll(photo[:24, :32], 2 * t, axis=1)
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  p = lambda name: str(tmp_path / name)

  # The command line: encode an image -> [h, w] int32 (f = 2), same as pre-tokenisation.
  status, path = run_command(["encode", f"--workdir={tokenizer_dir}", f"--input={p('photo.png')}",
                              f"--out={p('photo.npy')}"])
  assert status == 0 and path == p("photo.npy")
  grid = np.load(p("photo.npy"))
  assert grid.shape == (48, 60) and grid.dtype == np.int32
  config = load_json(os.path.join(tokenizer_dir, "config.json"))
  encoder = pretokenize.Encoder(*trainer.load(config, tokenizer_dir))
  np.testing.assert_array_equal(grid, encoder(photo[None])[0])

  # Video -> [T, h, w] with its fps; a folder -> one grid per image.
  tool.encode(tokenizer, str(video), p("clip.npz"), short_side=16, max_frames=4)
  with np.load(p("clip.npz")) as f:
    assert f["tokens_0"].shape == (4, 8, 10) and list(f["names"]) == ["clip.mp4"]
    assert float(f["fps"][0]) == pytest.approx(10.0) and int(f["factor"]) == 2
  tool.encode(tokenizer, p("folder"), p("folder.npz"))
  with np.load(p("folder.npz")) as f:
    assert sorted(f.files) == ["factor", "fps", "names", "num_codes", "tokens_0", "tokens_1"]
    assert f["tokens_1"].shape == (48, 16)

  # PNG whole and tiled: equal (local decoder, overlap >= its receptive radius of 9 tokens).
  tool.decode(tokenizer, p("photo.npy"), p("whole.png"))
  status, path = run_command(["decode", f"--workdir={tokenizer_dir}", f"--input={p('photo.npy')}",
                              f"--out={p('tiled.png')}", "--tile=24,24", "--overlap=9,9"])
  assert status == 0, path
  whole = np.asarray(Image.open(p("whole.png")))
  assert whole.shape == (96, 120, 3)
  np.testing.assert_array_equal(np.asarray(Image.open(p("tiled.png"))), whole)
  tool.decode(tokenizer, p("photo.npy"), p("tiled.npy"), tile=(20, 20), overlap=(9, 9))
  np.testing.assert_array_equal(np.load(p("tiled.npy")), whole)
  assert not list(tmp_path.glob("*.tmp*"))  # temp files renamed or removed

  # A video grid to GIF and MP4: frame count and size kept.
  tool.decode(tokenizer, p("clip.npz"), p("clip.gif"))
  with Image.open(p("clip.gif")) as gif:
    assert gif.n_frames == 4 and gif.size == (20, 16)
  tool.decode(tokenizer, p("clip.npz"), p("clip.mp4"), fps=5.0)
  with av.open(p("clip.mp4")) as f:
    frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
  assert len(frames) == 4 and frames[0].shape == (16, 20, 3)


def test_command_errors_name_the_flag_or_file(tokenizer_dir, tokenizer, tmp_path):
  from nuwa_jax.data.media import MediaError
  from nuwa_jax.tools import vqgan as tool
  np.save(tmp_path / "grid.npy", np.full((4, 6), 5, np.int32))
  np.save(tmp_path / "big.npy", np.full((4, 6), 99, np.int32))
  np.savez(tmp_path / "two.npz", tokens_0=np.zeros((2, 2), np.int32),
           tokens_1=np.zeros((2, 2), np.int32))
  (tmp_path / "broken.png").write_bytes(b"not a png")
  p = lambda name: str(tmp_path / name)
  wd = f"--workdir={tokenizer_dir}"
  # Flags, checked before the tokenizer is loaded.
  for argv, pattern in [
      (["encode", f"--workdir={p('nowhere')}", f"--input={p('grid.npy')}",
        f"--out={p('x.npy')}"], "--workdir=.*nowhere.*no config.json"),
      (["encode", wd, f"--input={p('grid.npy')}", f"--out={p('x.txt')}"],
       "--out=.*x.txt.*expected one of .npy, .npz"),
      (["decode", wd, f"--input={p('grid.npy')}", f"--out={p('x.png')}", "--tile=a"],
       "--tile='a': expected 'rows,cols'"),
      (["decode", wd, f"--out={p('x.png')}"], "--input is required"),
      (["transcode", wd, f"--input={p('grid.npy')}", f"--out={p('x.png')}"],
       "expected one command, encode or decode")]:
    status, message = run_command(argv)
    assert status == 2 and re.search(pattern, message), (argv, message)
  # Files and grids.
  for fn, args, pattern in [
      (tool.encode, (p("missing.png"), p("x.npy")), "--input=.*missing.png.*no such file"),
      (tool.encode, (p("grid.npy"), p("x.npy")), "--input=.*grid.npy.*unsupported file type"),
      (tool.encode, (p("broken.png"), p("x.npy")), "broken.png: not a readable image"),
      (tool.decode, (p("grid.npy"), p("x.png"), -1, (4, 4), (2, 2)),
       "--tile=4,4 --overlap=2,2: along rows"),
      (tool.decode, (p("big.npy"), p("x.png")),
       r"big.npy.*tokens range over \[99, 99\] but the tokenizer has 32 codes"),
      (tool.decode, (p("two.npz"), p("x.png")), "two.npz.*holds 2 token grids.*--item"),
      (tool.decode, (p("grid.npy"), p("x.mp4")), r"x.mp4.*a single \[h, w\] grid decodes to")]:
    with pytest.raises((tool.CommandError, MediaError), match=pattern):
      fn(tokenizer, *args)
  assert not list(tmp_path.glob("x*"))  # nothing half-written
