"""XLA:CPU defaults chosen for this library, applied when `nuwa_jax` is imported.

XLA:CPU (jaxlib 0.10.2) hands dots, reductions and elementwise ops to YNNPACK fusions. On a
CPU without AMX (measured on a 2-core AMD EPYC, Zen 3, AVX2, 2026-12-01) that is slower for
every step this library runs: the NUWA-Infinity train step 1.32x side by side (f32 9.82 ->
7.44 s; bf16 11.0 -> 7.8 s in separate runs), the VQGAN train step 1.27x, sampling unchanged
(BUILD_NOTES.md, "Build"; bench/README.md). There the library turns them off,
`--xla_cpu_experimental_ynn_fusion_type=` (an empty list). On CPUs with AMX (where bf16 dots
were 5x faster than f32 with XLA's defaults) it keeps the defaults: not measured there.

Nothing is changed when XLA_FLAGS already names the option, when NUWA_JAX_XLA_DEFAULTS=1 is
set, or when JAX's backends are already initialised (flags are read once, at start-up).
GPU and TPU compilers ignore the option.
"""

from __future__ import annotations

import os

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def _cpu_has_amx() -> bool:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          return "amx_bf16" in line.split()
  except OSError:
    pass
  return False


def backends_initialised() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(getattr(xla_bridge, "_backends", {}))
  except Exception:  # pylint: disable=broad-except
    return False


def apply_cpu_defaults() -> str | None:
  """Appends the library's XLA:CPU defaults to XLA_FLAGS; returns what it added (or None)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if (os.environ.get("NUWA_JAX_XLA_DEFAULTS") == "1" or "ynn_fusion_type" in flags
      or _cpu_has_amx() or backends_initialised()):
    return None
  os.environ["XLA_FLAGS"] = (flags + " " + YNN_OFF).strip()
  return YNN_OFF
