#!/usr/bin/env python
"""VQGAN tokenizer throughput on this machine: encode -> indices and indices -> decode, img/s.

Same configuration and JSON fields as the PyTorch peer `shared/peers/bench_vqgan.py` (taming
VQModel at random init): ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at 16, latent 256,
1024 codes, 256 px, batch 4. Each dtype prints one JSON line.

  python bench/bench_vqgan.py                          # float32 and bfloat16
  python bench/bench_vqgan.py --dtype float32 --ch 64
  python bench/bench_vqgan.py --seams                  # seam error of tiled decoding instead
  python bench/bench_vqgan.py --train-step --repeats 8 # tiny train-step variants side by side

With --seams it decodes a random token grid whole and in overlapping tiles (the real config
with attention and GroupNorm, and the same decoder without attention and with per-pixel norms)
and prints the mean abs differences inside the kept tile centres and at the tile borders.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nuwa_jax.models.vqgan import VQGAN  # noqa: E402


def timeit(fn, repeats, warmup):
  for _ in range(warmup):
    fn()
  times, util = [], []
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    times.append(dt)
    util.append((time.process_time() - c0) / dt)
  return times, util


def stats(xs):
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def rate(times, batch):
  s = stats(times)
  return {"median": batch / s["median"], "min": batch / s["max"], "max": batch / s["min"],
          "n": s["n"]}


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def gflop(compiled, batch):
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / batch / 1e9
  except Exception:  # pylint: disable=broad-except
    return None


def model_from_args(a, dtype, **over):
  kw = dict(ch=a.ch, ch_mult=tuple(int(x) for x in a.ch_mult.split(",")),
            num_res_blocks=a.num_res_blocks,
            attn_resolutions=tuple(int(x) for x in a.attn_resolutions.split(",") if x),
            resolution=a.resolution, z_channels=a.z_channels, embed_dim=a.embed_dim,
            num_codes=a.n_embed, dtype=dtype)
  kw.update(over)
  return VQGAN(**kw)


def bench(a, dtype):
  model = model_from_args(a, dtype)
  f = model.factor
  hw = a.resolution // f
  x = jax.random.normal(jax.random.key(1), (a.batch, a.resolution, a.resolution, 3))
  # rbg keys: XLA:CPU compiles threefry initialisers slowly (~2 s each); values are random
  # either way.
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), x[:1]))
  params = variables["params"]

  encode = jax.jit(lambda v, x: model.apply(v, x, method=VQGAN.encode)[1])
  decode = jax.jit(lambda v, i: model.apply(v, i, method=VQGAN.decode_indices))
  t0 = time.perf_counter()
  enc_c = encode.lower(variables, x).compile()
  idx = jax.block_until_ready(enc_c(variables, x))
  dec_c = decode.lower(variables, idx).compile()
  out = jax.block_until_ready(dec_c(variables, idx))
  compile_s = time.perf_counter() - t0
  assert idx.shape == (a.batch, hw, hw), idx.shape
  assert out.shape == x.shape, out.shape

  res = {"bench": "nuwa_jax_vqgan", "dtype": dtype,
         "env": {"python": platform.python_version(), "jax": jax.__version__,
                 "backend": jax.default_backend(), "devices": jax.device_count(),
                 "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                 "xla_flags": os.environ.get("XLA_FLAGS", "")},
         "config": {"resolution": a.resolution, "ch": a.ch, "ch_mult": model.ch_mult,
                    "num_res_blocks": a.num_res_blocks,
                    "attn_resolutions": model.attn_resolutions, "z_channels": a.z_channels,
                    "embed_dim": a.embed_dim, "n_embed": a.n_embed, "f": f,
                    "tokens": [hw, hw], "batch": a.batch},
         "params": {"encoder+quant_conv": count(params["encoder"]) +
                                          count(params["quant_conv"]),
                    "decoder+post_quant_conv": count(params["decoder"]) +
                                               count(params["post_quant_conv"]),
                    "codebook": count(params["quantizer"]), "total": count(params)},
         "compile_s": compile_s,
         "encode_gflop_per_image": gflop(enc_c, a.batch),
         "decode_gflop_per_image": gflop(dec_c, a.batch)}
  te, ue = timeit(lambda: jax.block_until_ready(enc_c(variables, x)), a.repeats, a.warmup)
  td, ud = timeit(lambda: jax.block_until_ready(dec_c(variables, idx)), a.repeats, a.warmup)
  res["encode_s_per_batch"] = stats(te)
  res["decode_s_per_batch"] = stats(td)
  res["encode_img_per_s"] = rate(te, a.batch)
  res["decode_img_per_s"] = rate(td, a.batch)
  for k in ("encode", "decode"):
    if res[f"{k}_gflop_per_image"]:
      res[f"{k}_gflop_per_s"] = res[f"{k}_gflop_per_image"] * res[f"{k}_img_per_s"]["median"]
  res["loadavg_end"] = os.getloadavg()
  res["cpu_util_timed_runs"] = stats(ue + ud)
  res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  print(json.dumps(res, default=float), flush=True)


def seams(a):
  """Tiled vs whole decoding of a random token grid; one JSON line per decoder variant."""
  from nuwa_jax import tiled_decode  # pylint: disable=import-outside-toplevel
  rows, cols = (int(v) for v in a.seam_grid.split("x"))
  tile = tuple(int(v) for v in a.seam_tile.split("x"))
  overlap = tuple(int(v) for v in a.seam_overlap.split("x"))
  idx = np.asarray(jax.random.randint(jax.random.key(2), (rows, cols), 0, a.n_embed))
  no_attn = dict(attn_resolutions=(), mid_attention=False)
  variants = {"taming": ("taming (attention, GroupNorm)", {}),
              "group": ("no attention, GroupNorm", no_attn),
              "attn": ("attention, per-pixel norm", dict(norm="pixel")),
              "local": ("no attention, per-pixel norm", dict(no_attn, norm="pixel"))}
  for key in a.seam_variants.split(","):
    name, over = variants[key]
    model = model_from_args(a, "float32", **over)
    f = model.factor
    variables = nn.unbox(jax.jit(model.init)(
        jax.random.key(0, impl="rbg"), jnp.zeros((1, a.resolution, a.resolution, 3))))
    decode = lambda i, v=variables, m=model: m.apply(v, i, method=VQGAN.decode_indices)
    t0 = time.perf_counter()
    tiled = tiled_decode.decode_tiled(decode, idx, tile, overlap, f, out_dtype="float32")
    t_tiled = time.perf_counter() - t0
    whole = np.asarray(jax.jit(decode)(jnp.asarray(idx)[None]))[0]
    err = tiled_decode.seam_error(tiled, whole, idx.shape, tile, overlap, f)
    print(json.dumps({"bench": "nuwa_jax_vqgan_seams", "decoder": name, "grid": [rows, cols],
                      "tile": tile, "overlap": overlap, "ch": a.ch, "tiled_s": t_tiled,
                      "mean_abs_output": float(np.mean(np.abs(whole))), **err}), flush=True)


TRAIN_VARIANTS = {
    # name: (config variant, overrides) -- the side-by-side of the tiny config's choice.
    "ch32": ("size=tiny", {"model.ch": 32, "model.ch_mult": (1, 2, 2, 4)}),
    "ch32_gan": ("size=tiny,gan=1", {"model.ch": 32, "model.ch_mult": (1, 2, 2, 4),
                                     "loss.disc_start": 0}),
    "tiny": ("size=tiny", {}),
    "tiny_gan": ("size=tiny,gan=1", {"loss.disc_start": 0}),
    "tiny_bf16": ("size=tiny", {"model.dtype": "bfloat16"}),
    "tiny_pixelnorm": ("size=tiny", {"model.norm": "pixel"}),
}


def train_steps(a):
  """Train-step time of tiny VQGAN variants, interleaved round by round in one process so
  that other jobs on the machine slow every variant alike; one JSON line per variant."""
  from configs import vqgan as vqgan_config  # pylint: disable=import-outside-toplevel
  from nuwa_jax.runtime import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from nuwa_jax.trainers import vqgan as trainer  # pylint: disable=import-outside-toplevel
  runs = []
  for name in a.train_variants.split(","):
    variant, over = TRAIN_VARIANTS[name]
    config = vqgan_config.get_config(variant)
    for path, value in over.items():
      *parents, leaf = path.split(".")
      node = config
      for key in parents:
        node = node[key]
      node[leaf] = value
    mesh = mesh_lib.create_mesh(config.mesh)
    t0 = time.perf_counter()
    built = trainer.build(config, mesh)
    compile_s = time.perf_counter() - t0
    state = built.sharded.init(jax.random.key(0))
    images = np.random.default_rng(0).uniform(
        -1, 1, (config.batch_size, config.crop_size, config.crop_size, 3)).astype(np.float32)
    batch = {"image": jax.device_put(images, built.layout.abstract_batch["image"].sharding)}
    for _ in range(2):
      state, m = built.train_step(state, batch)
    jax.block_until_ready(m)
    cost = built.train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    runs.append({"name": name, "built": built, "state": state, "batch": batch, "times": [],
                 "compile_s": compile_s, "gflop": float(cost["flops"]) / 1e9,
                 "gan": trainer.uses_gan(config)})
  load0 = os.getloadavg()
  for _ in range(a.repeats):
    for r in runs:
      t0 = time.perf_counter()
      r["state"], m = r["built"].train_step(r["state"], r["batch"])
      jax.block_until_ready(m)
      r["times"].append(time.perf_counter() - t0)
  for r in runs:
    s = stats(r["times"])
    print(json.dumps({"bench": "nuwa_jax_vqgan_train_step", "variant": r["name"],
                      "gan": r["gan"], "step_ms": {k: v * 1e3 if k != "n" else v
                                                   for k, v in s.items()},
                      "steps_per_s": 1.0 / s["median"], "gflop_per_step": r["gflop"],
                      "compile_s": r["compile_s"], "loadavg_start": load0,
                      "loadavg_end": os.getloadavg()}), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dtype", default="both", choices=("float32", "bfloat16", "both"))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--ch", type=int, default=128)
  p.add_argument("--ch-mult", type=str, default="1,1,2,2,4")
  p.add_argument("--num-res-blocks", type=int, default=2)
  p.add_argument("--attn-resolutions", type=str, default="16")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--z-channels", type=int, default=256)
  p.add_argument("--embed-dim", type=int, default=256)
  p.add_argument("--n-embed", type=int, default=1024)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seams", action="store_true", help="measure tiled-decoding seams instead")
  p.add_argument("--train-step", action="store_true",
                 help="time the train step of tiny config variants instead")
  p.add_argument("--train-variants", default="ch32,tiny,tiny_gan",
                 help=f"comma-separated, of {','.join(TRAIN_VARIANTS)}")
  p.add_argument("--seam-grid", default="32x48", help="token grid rows x cols")
  p.add_argument("--seam-tile", default="16x16")
  p.add_argument("--seam-overlap", default="4x4")
  p.add_argument("--seam-variants", default="taming,local",
                 help="decoders: taming, group (no attention), attn (per-pixel norm), local")
  a = p.parse_args()
  if a.seams:
    seams(a)
    return
  if a.train_step:
    train_steps(a)
    return
  for dtype in (("float32", "bfloat16") if a.dtype == "both" else (a.dtype,)):
    bench(a, dtype)


if __name__ == "__main__":
  main()
