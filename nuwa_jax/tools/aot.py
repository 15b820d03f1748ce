"""Compiles a trainer's sharded train step for a TPU topology ahead of time, on any machine.

  python -m nuwa_jax.tools.aot --config=configs/baseline.py:size=1b --topology=v5p:8x8x4
  python -m nuwa_jax.tools.aot --config=configs/baseline.py:size=1b --topology=v6e:16x16 \
      --config.mesh.fsdp=64 --config.mesh.data=-1

libtpu describes the topology's devices without any TPU attached; the mesh is built from
`config.mesh` over those devices and the trainer's own `build` compiles the train (and eval)
step, so the program, shardings and memory are those of the real run. The report: topology,
chips, hosts, mesh, parameter count, per-chip HBM from XLA's buffer assignment against the
chip's HBM, compile time, and FLOPs per step: the matmuls of the traced step (XLA's own cost
analysis counts a scanned layer once) beside 6 * parameters * tokens. The last line of stdout
is one JSON object:

  {"topology", "chips", "parameters", "per_chip_bytes": {arguments, outputs, aliased,
   temporaries, generated_code, total}, "hbm_bytes", "flops_per_step", "flops_per_chip",
   "fits", ...}

--topology is libtpu's GENERATION:CHIPS, the chip grid (not the core count of `v5p-512`):
  v4:2x2x1 ... v4:8x16x16      (3-D; 4 chips per host; compiled as megacore, 1 device/chip)
  v5p:2x2x1 ... v5p:16x16x24   (3-D; 4 chips per host; `v5p:8x8x4` = 256 chips = v5p-512)
  v5e:2x2 ... v5e:16x16        (2-D; `v5litepod` is not accepted)
  v6e:2x2 ... v6e:16x16        (2-D)
  tpu7x:2x2x1 ...              (3-D; 2 devices per chip)
Every dimension must be a multiple of the host's 2x2x1 chips.

Exit status: 0 fits; 1 does not fit (over --hbm_gib or the table, or the compiler itself ran
out of HBM); 2 bad --topology, config or flags; 3 libtpu or the compile failed otherwise.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

# Only compiles for a described topology: another process on this host holding libtpu's lock
# (any JAX program that probed the TPU backend) must not stop it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from nuwa_jax.config_utils import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology as GENERATION:CHIPS, e.g. v5p:8x8x4, v4:4x4x4, v5e:16x16, "
    "v6e:16x16, tpu7x:2x2x1.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None,
                              "HBM per chip in GiB for the fit check; overrides the table.")

GIB = 2 ** 30

# Usable HBM per chip (GiB) by device kind: what libtpu's compiler reports as "available HBM"
# per device (its out-of-memory message), times devices per chip. Nominal capacities in the
# comments; the compiler keeps a little back, and a program over its limit fails to compile.
HBM_GIB_PER_CHIP = {
    "TPU v3": 2 * 15.48,  # 2 x 16 GiB, one device per TensorCore
    "TPU v4": 30.75,  # 32 GiB
    "TPU v5 lite": 15.75,  # v5e, 16 GiB
    "TPU v5": 95.74,  # v5p, 95 GiB
    "TPU v5p": 95.74,
    "TPU v6 lite": 31.25,  # v6e, 32 GiB
    "TPU7x": 2 * 94.75,  # 192 GB, one device per TensorCore
}

# TPU_ACCELERATOR_TYPE for libtpu per generation; without it (and TPU_WORKER_HOSTNAMES) libtpu
# prints warnings about a missing TPU. It does not change the described topology.
_ACCELERATOR_TYPE = {"v3": "v3-8", "v4": "v4-8", "v5": "v5p-8", "v5p": "v5p-8",
                     "v5e": "v5litepod-4", "v6e": "v6e-4", "tpu7x": "tpu7x-8"}

_TOPOLOGY_RE = re.compile(r"^(?P<gen>[A-Za-z0-9_ ]+):(?P<shape>[0-9]+(x[0-9]+)*)$")


class Exit(Exception):
  """Ends the tool with a message on stderr and an exit status."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


# ----------------------------------------------------------------------------------------
# Topology
# ----------------------------------------------------------------------------------------

def topology_options(gen: str, chips: tuple[int, ...]) -> dict[str, Any]:
  """libtpu options that make the compile-only devices those of a real slice.

  v4 runs each chip's two TensorCores as one (megacore) device, as JAX does on v4 VMs. Torus
  wrap-around: a v4/v5p slice of whole 4x4x4 cubes wraps in all three dimensions, a smaller one
  in none; a v5e/v6e dimension wraps when it spans the pod's 16 chips. libtpu's default is no
  wrap at all, which lowers the collectives differently (for the 1b baseline on v5p:4x4x4:
  5 % more temporaries, 40 % more code and a slower compile than with the real torus).
  """
  options: dict[str, Any] = {}
  if gen == "v4":
    options["chip_config_name"] = "megacore"
  if gen in ("v4", "v5", "v5p") and len(chips) == 3:
    options["wrap"] = (all(c % 4 == 0 for c in chips),) * 3
  elif gen in ("v5e", "v6e") and len(chips) == 2:
    options["wrap"] = (chips[0] == 16, chips[1] == 16, False)
  return options


def topology_devices(name: str) -> tuple[list[Any], dict[str, Any]]:
  """libtpu's compile-only devices for `name` and the options used (see topology_options).

  Raises:
    Exit: status 2 naming --topology if libtpu does not accept it.
  """
  match = _TOPOLOGY_RE.match(name)
  if not match:
    raise Exit(2, f"--topology={name!r}: expected GENERATION:CHIPS such as v5p:8x8x4, "
                  "v4:4x4x4, v5e:16x16 or v6e:16x16.")
  gen = match["gen"].lower()
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", _ACCELERATOR_TYPE.get(gen, "v5p-8"))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    options = topology_options(gen, tuple(map(int, match["shape"].split("x"))))
    topo = topologies.get_topology_desc(name, "tpu", **options)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).strip()
    if message.startswith(("INVALID_ARGUMENT", "NOT_FOUND")):
      raise Exit(2, f"--topology={name!r} is not a TPU topology libtpu knows: "
                    f"{message}") from None
    # Not the flag's fault, e.g. libtpu is not installed (`pip install libtpu`).
    raise Exit(3, f"libtpu could not describe --topology={name!r}: {message}") from None
  return list(topo.devices), options


def count_chips(devices) -> int:
  return len({(getattr(d, "slice_index", 0), tuple(getattr(d, "coords", (d.id,))))
              for d in devices})


# ----------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------

def jaxpr_matmul_flops(jaxpr) -> int:
  """2*M*N*K of every dot_general in a jaxpr (global shapes), loops times their trip count.

  XLA's cost analysis counts the body of a loop once, so for a model whose layers are an
  `nn.scan` it misses (depth - 1) of them; this count does not. Rematerialised forward passes
  appear in the differentiated jaxpr and are counted. Elementwise work is not counted (a few
  percent for a transformer); a `while` of unknown length counts once.
  """
  import jax.extend.core as jcore  # pylint: disable=g-import-not-at-top
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in lhs_contract)
      continue
    subs = [j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j
            for j in jcore.jaxprs_in_params(eqn.params)]
    if not subs:
      continue
    if eqn.primitive.name == "cond":
      total += max(jaxpr_matmul_flops(j) for j in subs)
    elif eqn.primitive.name == "scan":
      total += eqn.params["length"] * sum(jaxpr_matmul_flops(j) for j in subs)
    else:
      total += sum(jaxpr_matmul_flops(j) for j in subs)
  return total


def step_flops(train_fn, layout) -> int | None:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return jaxpr_matmul_flops(jax.make_jaxpr(train_fn)(*layout.train_args()).jaxpr)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not trace the train step for a FLOP count: %s", e)
    return None


# ----------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------

def per_device_bytes(compiled) -> dict[str, int]:
  """HBM of one device running `compiled`, from XLA's buffer assignment.

  total = arguments + outputs - aliased + temporaries + generated code: the inputs (train
  state and batch) stay resident for the whole step, outputs get new buffers except those
  aliased onto donated inputs (the new train state reuses the old one's), temporaries are the
  step's scratch allocation at its peak, and the executable's code lives in HBM too. This is
  an upper bound on what the step holds at once; it does not count the allocator's
  fragmentation or buffers kept from other programs (the eval step's temporaries are separate
  because the two steps never run at the same time). XLA's `peak_memory_in_bytes` (a heap
  simulation) comes out lower and is not used. On v4/v5e/v6e a small program can report zero
  temporaries.
  """
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
             generated_code=m.generated_code_size_in_bytes)
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] +
                  out["generated_code"])
  return {k: int(v) for k, v in out.items()}


def xla_flops(compiled) -> float | None:
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else None
  return float(costs["flops"]) if costs and "flops" in costs else None


# ----------------------------------------------------------------------------------------
# Compile and report
# ----------------------------------------------------------------------------------------

def compile_for_topology(config, topology: str, hbm_gib: float | None) -> dict[str, Any]:
  """Builds the trainer's steps on the topology's mesh; returns the report as a dict.

  Raises:
    Exit: bad --topology, --hbm_gib or config (2), or a compile failure other than running
      out of HBM (3).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from nuwa_jax.config_utils import ConfigError  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime.sharding import ShardingError  # pylint: disable=g-import-not-at-top
  config_errors = (ConfigError, mesh_lib.MeshConfigError, ShardingError)

  if hbm_gib is not None and not hbm_gib > 0:
    raise Exit(2, f"--hbm_gib={hbm_gib}: expected a positive number.")
  try:
    trainer = importlib.import_module(f"nuwa_jax.trainers.{config.trainer}")
  except ModuleNotFoundError:
    raise Exit(2, f"--config: trainer {config.trainer!r} does not exist (expected a module "
                  "in nuwa_jax/trainers/).") from None

  devices, options = topology_devices(topology)
  wrap = options.get("wrap")
  kind = devices[0].device_kind
  if devices[0].platform != "tpu":
    raise Exit(2, f"--topology={topology!r} describes {devices[0].platform} devices, not TPU.")
  chips, hosts = count_chips(devices), len({d.process_index for d in devices})
  devices_per_chip = len(devices) // chips
  hbm_source = "--hbm_gib"
  if hbm_gib is None:
    if kind not in HBM_GIB_PER_CHIP:
      raise Exit(2, f"no HBM size known for {kind!r} (--topology={topology!r}); pass "
                    "--hbm_gib.")
    hbm_gib, hbm_source = HBM_GIB_PER_CHIP[kind], f"table: {kind}"

  try:
    trainer.validate(config, num_devices=len(devices), num_processes=hosts)
    mesh = mesh_lib.create_mesh(config.mesh, devices=devices)
    layout = trainer.make_layout(config, mesh)
  except config_errors as e:
    raise Exit(2, f"bad config: {e}") from None

  torus = "" if wrap is None else ", torus wrap-around " + "/".join(
      "yes" if w else "no" for w in wrap[:topology.count("x") + 1])
  print(f"topology         {topology}: {kind}, {chips} chips, {len(devices)} devices, "
        f"{hosts} hosts{torus}", flush=True)
  logging.info("compiling for %s on mesh %s ...", topology, mesh_lib.describe(mesh))
  start = time.perf_counter()
  built, error = None, None
  try:
    built = trainer.build(config, mesh)
  except config_errors as e:
    raise Exit(2, f"bad config: {e}") from None
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      logging.exception("compile failed")
      raise Exit(3, f"compile failed: {e}") from None
    error = str(e).strip()
  compile_seconds = time.perf_counter() - start
  logging.info("compile time: %.1f s", compile_seconds)

  # Parameters and FLOPs come from the layout and the traced step, so they are reported even
  # when the compile ran out of memory.
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(layout.sharded.abstract.params))
  tokens = layout.tokens_per_step
  traced_flops = step_flops(trainer.make_train_fn(config, layout), layout)

  per_chip = xla_per_chip = eval_total = None
  if built is not None:
    per_chip = {k: v * devices_per_chip for k, v in per_device_bytes(built.train_step).items()}
    if getattr(built, "eval_step", None) is not None:
      eval_total = per_device_bytes(built.eval_step)["total"] * devices_per_chip
    flops = xla_flops(built.train_step)
    xla_per_chip = flops * devices_per_chip if flops is not None else None
  if traced_flops is not None:
    flops_per_step, flops_per_chip = traced_flops, traced_flops / chips
  elif xla_per_chip is not None:
    flops_per_step, flops_per_chip = xla_per_chip * chips, xla_per_chip
  else:
    flops_per_step = flops_per_chip = None
  hbm_bytes = int(hbm_gib * GIB)
  report = dict(
      topology=topology, device_kind=kind, chips=chips, devices=len(devices), hosts=hosts,
      wrap=list(wrap) if wrap is not None else None,
      mesh=dict(mesh.shape), parameters=params, tokens_per_step=tokens,
      per_chip_bytes=per_chip, hbm_bytes=hbm_bytes, hbm_source=hbm_source,
      flops_per_step=flops_per_step, flops_per_chip=flops_per_chip,
      flops_source="traced" if traced_flops is not None else "xla",
      xla_flops_per_chip=xla_per_chip,
      model_flops_per_step=6 * params * tokens if params and tokens else None,
      eval_total_bytes_per_chip=eval_total, compile_seconds=round(compile_seconds, 1),
      fits=per_chip is not None and per_chip["total"] <= hbm_bytes)
  if error:
    report["error"] = error
  return report


def human_bytes(n: float) -> str:
  if abs(n) >= GIB:
    return f"{n / GIB:9.2f} GiB"
  return f"{n / 2 ** 20:9.2f} MiB"


def human_count(n: float) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(n)


def human_flops(n: float) -> str:
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if n >= scale:
      return f"{n / scale:.3f} {unit}FLOP"
  return f"{n:.0f} FLOP"


def print_report(r: dict[str, Any]) -> None:
  """The human-readable lines (after the topology line), then the report as one JSON line."""
  print("mesh             " + " ".join(f"{k}={v}" for k, v in r["mesh"].items()))
  params = r["parameters"]
  print(f"parameters       {params:,} ({human_count(params)})" if params is not None else
        "parameters       unknown")
  print(f"compile time     {r['compile_seconds']:.1f} s (train and eval steps)")
  per_chip = r["per_chip_bytes"]
  if per_chip is not None:
    print("per-chip HBM, train step:")
    for k, note in (("arguments", "train state and batch"),
                    ("outputs", "new train state and metrics"),
                    ("aliased", "outputs written over the donated state: subtracted"),
                    ("temporaries", "activations, gradients, scratch"),
                    ("generated_code", "the executable"),
                    ("total", "arguments + outputs - aliased + temporaries + code")):
      print(f"  {k.replace('_', ' '):<16}{human_bytes(per_chip[k])}   {note}")
  if r["eval_total_bytes_per_chip"] is not None:
    print(f"  eval step total {human_bytes(r['eval_total_bytes_per_chip'])}")
  if "error" in r:
    print(f"compile ran out of HBM: {r['error']}")
  print(f"HBM per chip     {human_bytes(r['hbm_bytes']).strip()} ({r['hbm_source']})")
  if per_chip is not None:
    print(f"utilisation      {100 * per_chip['total'] / r['hbm_bytes']:.1f} %")
  if r["flops_per_step"] is not None:
    how = ("matmuls of the traced step, a scanned layer times its trip count"
           if r["flops_source"] == "traced" else "XLA cost model")
    print(f"FLOPs per step   {human_flops(r['flops_per_step'])} total, "
          f"{human_flops(r['flops_per_chip'])} per chip ({how})")
  if r["xla_flops_per_chip"] is not None and r["flops_source"] == "traced":
    print(f"XLA cost model   {human_flops(r['xla_flops_per_chip'])} per chip (counts a loop "
          "body once, so it misses scanned layers)")
  if r["model_flops_per_step"] is not None:
    ratio = r["flops_per_step"] / r["model_flops_per_step"] if r["flops_per_step"] else None
    print(f"6 * N * T        {human_flops(r['model_flops_per_step'])} per step "
          f"({r['tokens_per_step']:,} tokens/step" +
          (f"; FLOPs per step / 6NT = {ratio:.2f})" if ratio else ")"))
  if r["fits"]:
    print("fits")
  else:
    print(f"DOES NOT FIT in {human_bytes(r['hbm_bytes']).strip()} of HBM per chip.")
  print(json.dumps(r), flush=True)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  # Nothing runs here: the only backend needed is libtpu's compile-only client. CPU stays the
  # default backend (unless JAX_PLATFORMS says otherwise), so on a TPU VM the chips are left
  # to whatever is using them.
  if not os.environ.get("JAX_PLATFORMS"):
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
  try:
    report = compile_for_topology(_CONFIG.value, _TOPOLOGY.value, _HBM_GIB.value)
  except Exit as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.status)
  print_report(report)
  sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
  # Required only as a command: importing this module (for its functions) leaves the global
  # flags of other programs and tests alone.
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main, flags_parser=parse_flags)  # bad flags and config overrides: status 2
