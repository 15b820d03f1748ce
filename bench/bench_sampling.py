#!/usr/bin/env python
r"""NUWA-Infinity generation on this CPU: memory and time against canvas width, and tokens/s of
pool-cached sampling against recomputation and taming-style sliding windows (issue 6, items 3, 7).
Each measurement runs in a FRESH child process and prints a JSON line (with os.getloadavg());
then a summary line per section. From the repo root:

  JAX_PLATFORMS=cpu /work/venv/bin/python bench/bench_sampling.py --section=all
  JAX_PLATFORMS=cpu /work/venv/bin/python bench/bench_sampling.py --section=width --rows=2 \
      --widths=8,16,32,64 --plot=bench/results/sampling_width.png
  JAX_PLATFORMS=cpu /work/venv/bin/python bench/bench_sampling.py --section=speed --threads=1 \
      --samplers=cached=1,uncached=1,sliding=128,peer=128 --repeats=2

--section=width: unconditional panoramas through `nuwa_jax.sample.run` (sampling, VQGAN decoding
  of finished column strips, PNGs, state.npz), --rows patch rows x --widths patch columns, from
  random-init checkpoints (temp dir) of configs/vqgan.py:size=tiny (f8, 512 codes) and
  configs/nuwa_infinity.py:size=tiny (width 128, depth 2, 4x4 patches, extent (1,2,2), text on,
  vocab = the tokenizer's 512). peak_rss_mb: the child's VmHWM (whole process); generation_peak_
  rss_mb: VmHWM reset after compiling; ms_per_patch: result['seconds'] / patches (compile out:
  warm_decoder compiles the decoder in compile_seconds); ms_per_patch_steady: mean time between
  finished columns / rows, first column out. Target: widest peak RSS <= 1.15 x narrowest.
--section=speed: a 16x64-token canvas (1x4 patches of 16x16), width 512, depth 8, heads 8, mlp
  2048, vocab 1024, no text, extent (0,1,1) (K = 9 offsets; the sampler attends to M = 5
  compact entries, 1280 context tokens), random params, batch 1, top-k 100 (as the peer).
  --samplers NAME=N: N patches (NUWA) or tokens (sliding, peer) are timed, 0 = all, fewer
  are extrapolated (every patch/token costs the same). cached: nuwa_jax.sampler.PatchSampler
  as is (per layer a [B*H, L, Dh] cache); uncached: PatchSampler(cached=False), the full
  teacher-forced forward per token; cached_b<N>: cached with a batch of N canvases (tokens/s
  counts all N; sliding_b<N> likewise); sliding: taming's loop in JAX, a GPT of the same size
  (models/baseline.py, 16x16 image) on the 256-token window for every token, placed by
  local_offset; peer: shared/peers/bench_sliding_window.py (minGPT, torch, f32).
  tokens_per_s (wall) and tokens_per_cpu_s (CPU time, less sensitive to other jobs) exclude
  compile (compile_s); peak_rss_mb: VmHWM (peer: ru_maxrss), sampling_peak_rss_mb: reset after
  setup. --threads 1: all on core 1 (taskset), one thread. Summary: medians; ratios [wall, CPU]
  of cached / sliding (target >= 10), / peer, / uncached.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

PEERS = os.environ.get("PEERS_DIR", os.path.join(os.path.dirname(REPO), "shared", "peers"))
PEER_PY = os.path.join(os.path.expanduser(os.environ.get("PEER_VENV", "~/.venvs/peers")),
                       "bin", "python")
SPEED = dict(vocab=1024, patch_rows=16, patch_cols=16, extent=(0, 1, 1), width=512, depth=8,
             num_heads=8, mlp_dim=2048)
CANVAS = (16, 64)  # tokens
TOP_K = 100


def vm(field: str) -> float:  # VmHWM / VmRSS of this process, MB
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) / 1024 for l in f if l.startswith(field + ":"))


def emit(result: dict) -> dict:
  result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(result, default=float), flush=True)
  return result


def child_setup(root: str) -> dict:
  """Random-init tiny VQGAN + tiny NUWA-Infinity workdirs, saved like trained ones."""
  from configs import nuwa_infinity as nuwa_config, vqgan as vqgan_config
  from nuwa_jax.config_utils import write_config
  from nuwa_jax.runtime import mesh as mesh_lib
  from nuwa_jax.runtime.checkpoint import Checkpointer
  from nuwa_jax.trainers import nuwa_infinity, vqgan as vqgan_trainer
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])

  def save(layout, config, workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 1, 1, async_save=False)
    ckpt.maybe_save(1, layout.sharded.init(jax.random.key(0)), {"batches": 1}, force=True)
    ckpt.wait(), ckpt.close(), write_config(config, workdir)

  vq, nuwa = vqgan_config.get_config("size=tiny"), nuwa_config.get_config("size=tiny")
  save(vqgan_trainer.make_layout(vq, mesh), vq, os.path.join(root, "vqgan"))
  nuwa.model.vocab = vq.model.num_codes
  nuwa.data.tokenizer_workdir = os.path.join(root, "vqgan")
  save(nuwa_infinity.make_layout(nuwa, mesh), nuwa, os.path.join(root, "nuwa"))
  f = 2 ** (len(vq.model.ch_mult) - 1)
  return {"patch_px": [nuwa.model.patch_rows * f, nuwa.model.patch_cols * f]}


def child_width(root: str, cols: int, rows: int, patch_px) -> dict:
  from nuwa_jax import sample as sample_lib
  init, on_unit, times, marks = sample_lib.Decoder.__init__, sample_lib.Decoder.on_unit, [], []

  def warm_decoder(self, loaded, out, canvas, fps=4.0):  # bench-only: compile the tile decode
    init(self, loaded, out, canvas, fps)  # in compile_seconds, not at the first column
    np.asarray(self._decode(np.zeros((canvas.batch * len(self.rows), self.th, self.tw), int)))
    marks.extend([vm("VmRSS"), vm("VmHWM")])  # then reset VmHWM: the peak while generating
    open("/proc/self/clear_refs", "w").write("5")
  sample_lib.Decoder.__init__ = warm_decoder
  sample_lib.Decoder.on_unit = lambda self, *a: (on_unit(self, *a), times.append(time.time()))
  request = sample_lib.Request(task="unconditional", checkpoint=os.path.join(root, "nuwa"),
                               out=os.path.join(root, f"out{cols}"), height=rows * patch_px[0],
                               width=cols * patch_px[1], seed=0)
  loaded = sample_lib.load(request)
  rss_loaded = vm("VmRSS")
  result, generation_peak = sample_lib.run(request, loaded), vm("VmHWM")
  return {"cols": cols, "rows": rows, "patches": result["patches"],
          "pixels": [n * loaded.factor for n in result["tokens"].shape[-2:]],
          "seconds": result["seconds"], "compile_seconds": result["compile_seconds"],
          "ms_per_patch": 1e3 * result["seconds"] / result["patches"],
          "ms_per_patch_steady": 1e3 * float(np.diff(times).mean()) / rows,
          "rss_after_load_mb": round(rss_loaded, 1), "rss_before_generation_mb": round(marks[0], 1),
          "generation_peak_rss_mb": round(generation_peak, 1),
          "peak_rss_mb": round(max(marks[1], generation_peak), 1)}


def child_speed(kind: str, dtype: str, limit: int, repeats: int) -> dict:
  from nuwa_jax import context_pool, generate as gen
  from nuwa_jax.models import baseline, nuwa
  from nuwa_jax.sampler import PatchSampler, SamplingOptions, choose
  (h, w), win = CANVAS, SPEED["patch_rows"]
  t0, spec, options = time.time(), jax.ShapeDtypeStruct, SamplingOptions(top_k=TOP_K)
  batch = int(kind.split("_b")[1]) if "_b" in kind else 1  # <kind>_b<N>: N canvases at once
  if not kind.startswith("sliding"):  # cached, cached_b<N>, uncached
    canvas = gen.make_canvas("unconditional", (win, SPEED["patch_cols"]), batch, h, w)
    slots = context_pool.make_schedule(canvas.order, SPEED["extent"]).peak_occupancy
    model = nuwa.Model(**SPEED, dtype=dtype, pool_slots=slots)
    p, k = model.patch_tokens, model.num_context
    params = nn.meta.unbox(jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, p), jnp.int32),
        jnp.zeros((model.depth, 1, k, p, model.width)), jnp.zeros((1, k), bool)))["params"]
    setup_s, t0 = time.time() - t0, time.time()
    sampler = PatchSampler(model, params, batch, SamplingOptions(top_k=TOP_K,
                                                                 cached=kind != "uncached"))
    patches = min(limit or len(canvas.order), len(canvas.order))
    run = lambda s: gen.generate(sampler, canvas, s, progress=False,  # noqa: E731
                                 stop_after=patches)
    tokens_done = patches * p * batch
    extra = {"pool_slots": slots, "context_entries": sampler.entries, "batch": batch}
  else:  # taming's loop (scripts/sample_conditional.py) with a plain GPT of the same size
    model = baseline.Model(text_vocab=1, text_len=0, image_vocab=SPEED["vocab"], image_rows=win,
                  image_cols=win, dtype=dtype, **{k: SPEED[k] for k in ("width", "depth",
                                                                        "num_heads", "mlp_dim")})
    text = jnp.zeros((batch, 0), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), text[:1],
                                               jnp.zeros((1, win * win), jnp.int32)))["params"]
    setup_s, t0 = time.time() - t0, time.time()

    def step(params, canvas, where, key):  # where = [i, j, i_start, j_start, index in window]
      window = jax.lax.dynamic_slice(canvas, (0, where[2], where[3]), (batch, win, win))
      logits = model.apply({"params": params}, text, window.reshape(batch, win * win))
      logits = jax.lax.dynamic_index_in_dim(logits, where[4], axis=1, keepdims=False)
      return canvas.at[:, where[0], where[1]].set(choose(logits, key, options))

    compiled = jax.jit(step, donate_argnums=(1,)).lower(
        jax.tree.map(lambda a: spec(a.shape, a.dtype), params), spec((batch, h, w), jnp.int32),
        spec((5,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0))).compile()
    local = lambda pos, size: (pos if pos <= win // 2 else  # noqa: E731  taming's local_offset
                               win - (size - pos) if size - pos < win // 2 else win // 2)
    places = [jnp.asarray([i, j, i - local(i, h), j - local(j, w),
                           local(i, h) * win + local(j, w)], jnp.int32)
              for i in range(h) for j in range(w)]
    steps = min(limit or h * w, h * w)
    tokens_done, extra = steps * batch, {"batch": batch}

    def run(seed):
      canvas, key = jnp.zeros((batch, h, w), jnp.int32), jax.random.key(seed)
      for t in range(steps):
        canvas = compiled(params, canvas, places[t], jax.random.fold_in(key, t))
      return canvas
  compile_s, setup_peak = time.time() - t0, vm("VmHWM")
  open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM: then the peak while sampling
  seconds, cpu = [], []
  for r in range(repeats):
    t0, c0 = time.time(), time.process_time()
    out = np.asarray(run(r))
    seconds.append(time.time() - t0)
    cpu.append((time.process_time() - c0) / seconds[-1])
  med = statistics.median(seconds)
  return {"kind": kind, "dtype": dtype, "tokens_timed": tokens_done, "tokens_canvas": h * w,
          "extrapolated": tokens_done < h * w * extra.get("batch", 1), "seconds": seconds,
          "canvas_seconds": med * h * w / tokens_done, "tokens_per_s": tokens_done / med,
          "tokens_per_cpu_s": tokens_done / statistics.median(np.multiply(seconds, cpu)),
          "setup_s": setup_s, "compile_s": compile_s, "cpu_util": cpu,
          "distinct_tokens": len(np.unique(out)), "sampling_peak_rss_mb": round(vm("VmHWM"), 1),
          "peak_rss_mb": round(max(setup_peak, vm("VmHWM")), 1), **extra}


def spawn(cmd, threads: int = 2) -> dict:
  """Runs a child; its last JSON line, with the load average before it started."""
  load, env = [round(x, 2) for x in os.getloadavg()], {**os.environ, "JAX_PLATFORMS": "cpu"}
  if threads == 1:  # one thread, pinned to one core (JAX runs independent ops in parallel)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    cmd = ["taskset", "-c", "1", *cmd]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return {**json.loads(lines[-1]), "loadavg_before": load}


def child(*args, threads: int = 2) -> dict:  # this script in a fresh process
  return spawn([sys.executable, os.path.abspath(__file__), "--child", *map(str, args)], threads)


def peer(steps: int, threads: int) -> dict:
  cmd = [str(c) for c in (
      PEER_PY, os.path.join(PEERS, "bench_sliding_window.py"), "--height", CANVAS[0], "--width",
      CANVAS[1], "--dim", SPEED["width"], "--depth", SPEED["depth"], "--heads",
      SPEED["num_heads"], "--vocab", SPEED["vocab"], "--top-k", TOP_K, "--max-steps", steps,
      "--threads", threads)]
  r = spawn(cmd)
  return {"kind": "peer", "dtype": "float32", "command": " ".join(cmd),
          "tokens_per_cpu_s": r["tokens_per_s"] / r["cpu_util_sample_loop"],
          "tokens_timed": r["steps_done"], "canvas_seconds": r["sample_wall_s_extrapolated_full"],
          **{k: r[k] for k in ("impl", "tokens_per_s", "step_ms", "cpu_util_sample_loop",
                               "peak_rss_mb", "loadavg_before")}}


def section_width(a) -> dict:
  with tempfile.TemporaryDirectory(prefix="bench_sampling_") as root:
    patch_px = child("setup", root)["patch_px"]
    rows = [emit({"section": "width", **child("width", root, c, a.rows, json.dumps(patch_px))})
            for c in a.widths]
  _ = a.plot and plot(rows, a.plot)
  by = lambda key: {r["cols"]: round(r[key], 1) for r in rows}  # noqa: E731
  ratio = lambda key: rows[-1][key] / rows[0][key]  # noqa: E731
  return emit({"section": "width", "summary": True, "patch_px": patch_px,
               **{k: by(k) for k in ("peak_rss_mb", "ms_per_patch", "ms_per_patch_steady")},
               "rss widest/narrowest (target <= 1.15)": ratio("peak_rss_mb"),
               "steady time widest/narrowest": ratio("ms_per_patch_steady"),
               "loads": {r["cols"]: r["loadavg"] for r in rows}})


def plot(rows, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = [r["cols"] for r in rows]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, key, style, label in ((ax1, "peak_rss_mb", "o-", "peak RSS (process)"),
                                (ax1, "generation_peak_rss_mb", "^-", "peak while generating"),
                                (ax1, "rss_before_generation_mb", "s--", "before generating"),
                                (ax2, "ms_per_patch", "o-", "seconds / patches"),
                                (ax2, "ms_per_patch_steady", "s--", "after the 1st column")):
    ax.plot(cols, [r[key] for r in rows], style, label=label)
  ax1.axhline(1.15 * rows[0]["peak_rss_mb"], color="grey", ls=":", label="+15% of narrowest")
  for ax, ylabel, title in ((ax1, "MB", "memory"),
                            (ax2, "ms per patch", "time per patch (compile excluded)")):
    ax.set(xlabel="canvas width (patches)", ylabel=ylabel, ylim=(0, None), title=title)
    ax.set_xticks(cols, [str(c) for c in cols])
    ax.legend(fontsize=8)
  fig.suptitle("nuwa_jax.sample unconditional, random-init tiny VQGAN + NUWA-Infinity, %d px "
               "high; load average %s" % (rows[0]["pixels"][0], [r["loadavg"][0] for r in rows]))
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def section_speed(a) -> dict:
  runs = []
  dt = lambda k, d: d if k.startswith(("cached", "sliding")) else "float32"  # noqa: E731
  for _ in range(a.repeats):
    for kind, n in a.samplers:
      for dtype in sorted({dt(kind, d) for d in a.dtypes}, reverse=True):  # float32 first
        r = peer(n, a.threads) if kind == "peer" else child(
            "speed", kind, dtype, n, 2 if kind.startswith("cached") else 1, threads=a.threads)
        runs.append(emit({"section": "speed", "threads": a.threads, **r}))
  kinds = [k for k, _ in a.samplers]
  med = lambda k, d, key="tokens_per_s": statistics.median(  # noqa: E731
      [r[key] for r in runs if r["kind"] == k and r["dtype"] == dt(k, d)] or [float("nan")])
  summary = {"section": "speed", "summary": True, "threads": a.threads, **SPEED}
  for d in a.dtypes:
    summary[d] = {m: {k: round(med(k, d, m), 2) for k in kinds} for m in (
        "tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb")}  # ratios: [wall, CPU time]
    summary[d].update({f"{c}/{o}": [round(med(c, d, m) / med(o, d, m), 2) for m in (
        "tokens_per_s", "tokens_per_cpu_s")] for c in kinds for o in kinds
                       if c.startswith("cached") and not o.startswith("cached")})
  summary["loads"] = [r["loadavg"] for r in runs]
  return emit(summary)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--section", choices=("width", "speed", "all"), default="all")
  ap.add_argument("--widths", default="8,16,32,64")  # patches
  ap.add_argument("--rows", type=int, default=2)  # patches
  ap.add_argument("--plot", default=os.path.join(REPO, "bench/results/sampling_width.png"))
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--repeats", type=int, default=1)  # rounds of the speed samplers
  ap.add_argument("--samplers", default="cached=1,uncached=1,sliding=128,peer=128")
  ap.add_argument("--threads", type=int, default=2, choices=(1, 2))
  ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    kind, *r = a.child
    emit(child_setup(r[0]) if kind == "setup" else
         child_width(r[0], int(r[1]), int(r[2]), json.loads(r[3])) if kind == "width"
         else child_speed(r[0], r[1], int(r[2]), int(r[3])))
    # The cached_b8 child crashed at interpreter exit (SIGSEGV after its result, in 5 of 6
    # runs on 2026-12-01, also at the commit before the [B*H] cache): leave without teardown.
    sys.stdout.flush()
    os._exit(0)
  a.widths, a.dtypes = [int(x) for x in a.widths.split(",")], a.dtypes.split(",")
  a.samplers = [(k, int(n)) for k, n in (s.split("=") for s in a.samplers.split(","))]
  for name, fn in (("width", section_width), ("speed", section_speed)):
    if a.section in (name, "all"):
      fn(a)


if __name__ == "__main__":
  main()
