#!/usr/bin/env python
r"""NUWA-Infinity training on this CPU: train-step speed, and render-and-optimize vs full chain.

--section=train_step: the per-patch train step of trainers/nuwa_infinity.py (`build`) at width
  512, depth 8, heads 8, mlp 2048, vocab 1024, 16x16 patches (256 tokens), no text, batch 8,
  plus M*256 context tokens from the pool (extent (0,1,1): K = 9 offsets, of which at most
  M = 5 are ever valid with the library's orders: 1280 tokens). --variants: f32|bf16, then
  :scan|:noscan (default the config's: unrolled), :remat=full|dots, :extent=E.E.E, :ctx=M
  (context entries; 9 = one per offset).
  The PyTorch peer shared/peers/bench_gpt_train.py (GPT d512, 8 layers, 8 heads, vocab 1024,
  seq 256, batch 8, AdamW; minGPT, x-transformers) runs before and after ours, in its venv;
  --peers=xtmems is bench/peer_gpt_memory_train.py: that x-transformers GPT with per-layer
  memories of --peer-memory tokens (the same work as our context; ratios are against the fastest
  run of the first peer listed, with or without +kept). A peer named impl+kept runs with glibc keeping freed memory (the setting ours
  runs with, nuwa_jax/runtime/host_memory.py; NUWA_JAX_MALLOC_DEFAULTS=1: ours without it).
  FLOPs/step: matmuls of our traced step (tools/aot.py jaxpr_matmul_flops), the peer's own
  count; MFU against the 2048^3 matmul peak measured first (bf16 in, f32 accumulation).
--section=chain_vs_patch: configs/nuwa_infinity.py size=tiny, synthetic token grids, one grid
  (--grid), render_and_optimize (an update per patch) vs full_chain (one per chain), same init
  and training wall time (compile, evaluation excluded), constant lr after --warmup-updates;
  held-out nll (trainer.chain_nll, nats) at --evals points; plot (--plot). One JSON line per
  measurement, then a summary. From the repo root:

  JAX_PLATFORMS=cpu /work/venv/bin/python bench/bench_nuwa_train.py --section=all
  JAX_PLATFORMS=cpu /work/venv/bin/python bench/bench_nuwa_train.py --section=chain_vs_patch \
      --seconds=90 --grid=1,3,3 --plot=bench/results/nuwa_chain_vs_patch_1x3x3.png
  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 /work/venv/bin/python \
      bench/bench_nuwa_train.py --section=train_step --peer-threads=1   # one core each

The peer needs ${PEER_VENV:-~/.venvs/peers} (shared/peers/setup_venvs.sh torch).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nuwa_jax.runtime import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # as the train command (NUWA_JAX_MALLOC_DEFAULTS=1: off)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import nuwa_infinity as nuwa_config
from nuwa_jax.data.pipeline import HostBatchIterator
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.runtime import sharding as shd
from nuwa_jax.tools.aot import jaxpr_matmul_flops
from nuwa_jax.trainers import nuwa_infinity as trainer


def stats(xs):  # as shared/peers/benchutil.py
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def emit(result):  # one JSON line
  result["loadavg"] = os.getloadavg()
  print(json.dumps(result, default=float), flush=True)
  return result


def timed(fn, repeats, warmup):
  """Wall seconds and CPU utilisation (process CPU s / wall s) of `repeats` calls."""
  _ = [fn() for _ in range(warmup)]
  times, util = [], []
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    util.append((time.process_time() - c0) / times[-1])
  return times, util


# ------------------------------ (1) train step against the PyTorch GPT peer ----------------

def matmul_peak(dtype, n=2048, repeats=10):
  """GFLOP/s of an n^3 matmul with `dtype` inputs and float32 accumulation."""
  a, b = (jnp.asarray(np.random.default_rng(i).standard_normal((n, n)), dtype) for i in (0, 1))
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  times, _ = timed(lambda: f(a, b).block_until_ready(), repeats, 2)
  return {"best": 2 * n ** 3 / min(times) / 1e9}


def step_config(a, variant):
  """Tiny config with the issue's sizes. variant: 'f32'|'bf16', then any of ':scan' /
  ':noscan' (default: the config's, unrolled for tiny), ':remat=full|dots', ':extent=E.E.E'
  (default 0.1.1), ':ctx=M' (model.max_context; default 0: the most valid entries the
  library's orders produce, 5 at extent (0,1,1), 0 at extent (0,0,0))."""
  dtype, *opts = variant.split(":")
  c = nuwa_config.get_config("size=tiny,text=false")
  c.model.update(width=512, depth=8, num_heads=8, mlp_dim=2048, vocab=1024, patch_rows=16,
                 patch_cols=16, extent=(0, 1, 1), text_len=0, pool_slots=9, remat="none",
                 dtype={"f32": "float32", "bf16": "bfloat16"}[dtype])
  if "scan" in opts or "noscan" in opts:  # else the config's default (tiny: unrolled)
    c.model.scan_layers = "scan" in opts
  for key, _, value in (o.partition("=") for o in opts):
    if key == "remat":
      c.model.remat = value
    elif key == "extent":
      c.model.extent = tuple(int(x) for x in value.split("."))
    elif key == "ctx":
      c.model.max_context = int(value)
    elif key not in ("scan", "noscan"):
      raise ValueError(f"unknown variant option {key!r}")
  c.grids, c.batch_size = ((1, 3, 3),), a.batch  # 3x3 chains: 9 pool slots always suffice
  return c


def bench_nuwa_step(a, variant, peaks):
  config = step_config(a, variant)
  mesh = mesh_lib.create_mesh(config.mesh)
  t0, built = time.perf_counter(), trainer.build(config, mesh)
  compile_s = time.perf_counter() - t0
  layout = built.layout
  flops = jaxpr_matmul_flops(jax.make_jaxpr(trainer.make_train_fn(config, layout))(
      *layout.train_args()).jaxpr)
  chain = trainer.next_chain(config, batch_iterator(config, mesh), "random")
  steps = [trainer.to_global(built, chain.step(i)) for i in range(chain.num_steps)]
  box = {"state": built.sharded.init(jax.random.key(0)), "i": 0}

  def one():  # patches of the 3x3 chain in turn, the pool reset at each chain start
    if box["i"] % len(steps) == 0:
      box["pool"] = trainer.new_pool(built)
    box["state"], box["pool"], box["m"] = built.train_step(box["state"], box["pool"],
                                                           steps[box["i"] % len(steps)])
    box["i"] += 1
    jax.block_until_ready((box["state"], box["pool"]))

  times, util = timed(one, a.repeats, a.warmup)
  st = stats(times)
  tokens, k = config.batch_size * layout.model.patch_tokens, trainer.context_entries(config)
  return emit({
      "bench": "nuwa_train_step", "variant": variant, "jax": jax.__version__,
      "config": {"width": 512, "depth": 8, "heads": 8, "mlp": 2048, "vocab": 1024,
                 "patch_tokens": layout.model.patch_tokens, "extent": list(config.model.extent),
                 "context_offsets_K": layout.model.num_context, "context_entries_M": k,
                 "context_tokens": k * layout.model.patch_tokens,
                 "batch": config.batch_size, "text": False, "dtype": config.model.dtype,
                 "scan_layers": config.model.scan_layers, "remat": config.model.remat},
      "params": sum(x.size for x in jax.tree.leaves(layout.sharded.abstract.params)),
      "compile_s": compile_s, "s_per_step": st,
      "tokens_per_s": {"median": tokens / st["median"], "max": tokens / st["min"]},
      "flops_per_step": flops, **rates(flops, st["median"], peaks),
      "cpu_util": statistics.median(util), "final_loss": float(box["m"]["loss"]),
      "cpu_s_per_step": statistics.median(t * u for t, u in zip(times, util))})


def batch_iterator(config, mesh):
  return HostBatchIterator(trainer.make_sources(config)[0], config.batch_size,
                           shd.logical_sharding(("batch",), mesh, config.sharding.rules),
                           seed=config.seed)


def rates(flops, seconds, peaks):
  gflops = flops / seconds / 1e9
  return {"gflop_per_s": gflops, "mfu_vs_bf16_peak": gflops / peaks["bf16"]["best"],
          "mfu_vs_f32_peak": gflops / peaks["f32"]["best"]}


def run_peer(a, name, peaks):
  """name = impl, or impl+kept: the peer with glibc keeping freed memory (host_memory.GLIBC_ENV,
  the setting our train step runs with)."""
  impl, _, kept = name.partition("+")
  env = dict(os.environ, **(host_memory.GLIBC_ENV if kept else {}))
  python = a.peer_python or os.path.join(
      os.environ.get("PEER_VENV", os.path.expanduser("~/.venvs/peers")), "bin", "python")
  if impl == "xtmems":  # x-transformers with per-layer memories: the same work as ours
    cmd = [python, os.path.join(REPO, "bench", "peer_gpt_memory_train.py"), "--peers-dir",
           a.peers_dir, "--memory", str(a.peer_memory)]
  else:
    cmd = [python, os.path.join(a.peers_dir, "bench_gpt_train.py"), "--impl", impl]
  cmd += ["--dim", "512", "--depth", "8", "--heads", "8", "--vocab", "1024", "--seq", "256",
          "--batch", str(a.batch), "--repeats", str(a.repeats), "--warmup", str(a.warmup),
          "--threads", str(a.peer_threads)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
  if out.returncode or not lines:
    return emit({"bench": "peer_gpt_train_step", "impl": name, "cmd": " ".join(cmd),
                 "error": out.stderr[-2000:]})
  r = json.loads(lines[-1])
  fl, sec, util = r["flops_per_step"], r["s_per_step"], r["cpu_util_timed_runs"]["median"]
  flops = fl["measured_fwd_bwd"] or fl["analytic_total"]
  return emit({"bench": "peer_gpt_train_step", "impl": name, "cmd": " ".join(cmd),
               "torch": r["env"]["torch"], "params": r["params"]["total"], "s_per_step": sec,
               "config": {"context_tokens": r.get("config", {}).get("memory", 0)},
               "tokens_per_s": r["tokens_per_s"], "flops_per_step": flops, "flops_detail": fl,
               **rates(flops, sec["median"], peaks), "cpu_util": util,
               "cpu_s_per_step": util * sec["median"], "final_loss": r["final_loss"]})


def section_train_step(a):
  peaks = {k: matmul_peak(dt) for k, dt in (("bf16", jnp.bfloat16), ("f32", jnp.float32))}
  emit({"bench": "matmul_peak_gflops", "n": 2048, **peaks})
  impls = [impl for impl in a.peers.split(",") if impl != "none"]
  runs = [run_peer(a, impl, peaks) for impl in impls]  # before and after ours: the machine
  for _ in range(a.rounds):  # is shared; several rounds alternate peer and ours
    runs += [bench_nuwa_step(a, v, peaks) for v in a.variants.split(",")]
    runs += [run_peer(a, impl, peaks) for impl in impls]
  base = lambda impl: impl.partition("+")[0]  # noqa: E731  (impl and impl+kept alike)
  refs = [r for r in runs if impls and base(r.get("impl", "")) == base(impls[0])
          and "error" not in r]
  ref = max(refs, key=lambda r: r["gflop_per_s"], default=None)  # the peer at its best
  print(f"\nmatmul peak GFLOP/s: bf16 {peaks['bf16']['best']:.0f}, f32 {peaks['f32']['best']:.0f}"
        f"; ratios against the faster {impls[0] if refs else '-'} run")
  print(f"{'run':30s} {'ctx':>5s} {'s/step':>6s} {'CPU s':>5s} {'tok/s':>5s} {'GFLOP':>5s} "
        f"{'GFLOP/s':>7s} {'MFU bf16':>8s} {'tok/s x':>7s} {'FLOP/s x':>8s}")
  for r in runs:
    if "error" in r:
      print(f"peer {r['impl']}: FAILED ({r['error'][-300:]})")
      continue
    name = f"nuwa {r['variant']}" if "variant" in r else f"peer {r['impl']} (torch)"
    tok = r["tokens_per_s"]["median"]
    x = (f"{tok / ref['tokens_per_s']['median']:7.2f} "
         f"{r['gflop_per_s'] / ref['gflop_per_s']:8.2f}" if ref else "")
    print(f"{name:30s} {r.get('config', {}).get('context_tokens', 0):5d} "
          f"{r['s_per_step']['median']:6.2f} {r['cpu_s_per_step']:5.1f} {tok:5.0f} "
          f"{r['flops_per_step'] / 1e9:5.0f} {r['gflop_per_s']:7.1f} "
          f"{r['mfu_vs_bf16_peak']:8.1%} {x}")


# ------------------------------ (2) render-and-optimize against full-chain training -------

def chain_config(a, mode):
  c = nuwa_config.get_config(f"size=tiny,mode={mode}")
  c.grids = (tuple(int(x) for x in a.grid.split(",")),)
  c.total_steps = 10 ** 7  # stopped by time; constant lr after a short warm-up
  c.optimizer.update(decay="constant", warmup_steps=a.warmup_updates)
  return c


def run_mode(a, mode, built, chain_step, eval_source):
  config = chain_config(a, mode)
  batches, state = batch_iterator(config, built.mesh), built.sharded.init(jax.random.key(0))
  curve, train_s, updates, patches, next_eval = [], 0.0, 0, 0, 0.0

  while True:
    done = train_s >= a.seconds
    if done or train_s >= next_eval:
      nll = float(np.mean([trainer.chain_nll(config, built, state.params, chain).mean()
                           for chain in trainer.held_out_chains(config, built, eval_source,
                                                                "right", a.eval_chains)]))
      curve.append({"train_s": train_s, "updates": updates, "patches": patches, "eval_nll": nll})
      next_eval += a.seconds / a.evals
    if done:
      break
    t0 = time.perf_counter()
    chain = trainer.next_chain(config, batches, config.order)
    pool = trainer.new_pool(built)
    if mode == "full_chain":
      per_step = {k: getattr(chain, k) for k in trainer.STEP_FIELDS if k[:4] != "text"}
      inputs = dict(trainer.to_global(built, per_step, leading=1), **trainer.to_global(
          built, {"text": chain.text, "text_mask": chain.text_mask}))
      state, pool, m = chain_step(state, pool, inputs)
      updates += 1
    else:
      for i in range(chain.num_steps):
        state, pool, m = built.train_step(state, pool, trainer.to_global(built, chain.step(i)))
        updates += 1
    jax.block_until_ready(state)
    patches += chain.num_steps * config.batch_size
    train_s += time.perf_counter() - t0
  return emit({"bench": "nuwa_chain_vs_patch", "mode": mode, "grid": list(config.grids[0]),
               "seconds": train_s, "updates": updates, "patches_seen": patches,
               "final_train_loss": float(m["loss"]), "eval_nll": curve[-1]["eval_nll"],
               "curve": curve})


def section_chain_vs_patch(a):
  config = chain_config(a, "render_and_optimize")
  trainer.validate(config)  # the trainer's own checks; compiled steps shared by both modes
  built = trainer.build(config, mesh_lib.create_mesh(config.mesh))
  chain_step = trainer.compile_chain_step(config, built, int(np.prod(config.grids[0])))
  _, eval_source = trainer.make_sources(config)
  unigram = trainer.unigram_nll(eval_source, config.model.vocab)
  runs = [run_mode(a, mode, built, chain_step, eval_source)
          for mode in ("render_and_optimize", "full_chain")]
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for r in runs:
    for ax, key in zip(axes, ("train_s", "patches")):
      ax.plot([p[key] for p in r["curve"]], [p["eval_nll"] for p in r["curve"]], "o-",
              label=f"{r['mode']} ({r['updates']} updates)")
  for ax, label in zip(axes, ("training wall time (s)", "patch-examples seen")):
    ax.axhline(unigram, color="gray", ls=":", label="unigram nll")
    ax.set(xlabel=label, ylabel="held-out nll")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"NUWA-Infinity tiny, grid {config.grids[0]}, batch {config.batch_size}")
  fig.tight_layout()
  os.makedirs(os.path.dirname(a.plot), exist_ok=True)
  fig.savefig(a.plot, dpi=80)
  print(f"\nheld-out nll after {a.seconds:.0f} s (unigram {unigram:.3f}); plot {a.plot}")
  for r in runs:
    print(f"{r['mode']:22s} updates {r['updates']:5d}  patches {r['patches_seen']:6d}  "
          f"eval nll {r['eval_nll']:.3f}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--section", choices=("train_step", "chain_vs_patch", "all"), default="all")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--variants", default="f32,bf16,f32:scan,bf16:scan,f32:ctx=9,bf16:ctx=9,"
                 "bf16:extent=0.0.0", help="see step_config")
  p.add_argument("--peers", default="mingpt,xtransformers", help="peer impls or 'none'")
  p.add_argument("--rounds", type=int, default=1, help="variants then peers, this many times")
  p.add_argument("--peers-dir", default=os.path.join(os.path.dirname(REPO), "shared", "peers"))
  p.add_argument("--peer-python", default="", help="default ${PEER_VENV:-~/.venvs/peers}")
  p.add_argument("--peer-threads", type=int, default=2)
  p.add_argument("--peer-memory", type=int, default=1280,
                 help="xtmems: memory tokens per layer (ours: M=5 entries x 256 = 1280)")
  p.add_argument("--seconds", type=float, default=90.0, help="training time per mode")
  p.add_argument("--evals", type=int, default=6, help="evaluations per mode after the first")
  p.add_argument("--eval-chains", type=int, default=4)
  p.add_argument("--warmup-updates", type=int, default=10)
  p.add_argument("--grid", default="1,2,2")
  p.add_argument("--plot", default=f"{REPO}/bench/results/nuwa_chain_vs_patch.png")
  a, t0 = p.parse_args(), time.perf_counter()
  print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout)
  if a.section in ("train_step", "all"):
    section_train_step(a)
  if a.section in ("chain_vs_patch", "all"):
    section_chain_vs_patch(a)
  print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()}")


if __name__ == "__main__":
  main()
