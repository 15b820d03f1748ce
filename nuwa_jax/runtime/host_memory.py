"""Keep freed host memory in the process, so XLA:CPU steps do not page-fault their buffers in.

XLA:CPU allocates a step's temporary buffers with malloc and frees them after the step. glibc
serves any block larger than 32 MiB (and every large block requested from a thread other than
the main one, whatever the settings) with a fresh mmap and gives it back with munmap on free,
so every step touches its temporaries' pages for the first time again: the kernel faults each
4 KiB page in and zeroes it. Measured on the 2-core AMD EPYC (2026-12-01): the NUWA-Infinity
train step of bench/bench_nuwa_train.py (2.9 GB of temporaries) took 830 000 minor page faults
per step (9.1 s); with freed memory kept, none (7.8 s). One [64, 257, 1537] attention logits dot
(a 101 MB output) ran at 35 GFLOP/s with 27 000 faults per call, 80 GFLOP/s without.

`keep_freed_memory()` makes glibc keep it: one malloc arena for all threads (M_ARENA_MAX 1),
no mmap for large blocks (M_MMAP_MAX 0; they come from the heap), no trimming of the heap's top
(M_TRIM_THRESHOLD the largest value). The resident size then stays at its peak (the peak
itself is unchanged: a long run reuses the same blocks). It must run before JAX's backends
start (their threads get their arenas then); the train, demo and benchmark entry points call it
first. Other C libraries (or macOS, musl) are left alone. NUWA_JAX_MALLOC_DEFAULTS=1 turns it
off. `GLIBC_ENV` is the same setting for a child process (the PyTorch peers in bench/).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from nuwa_jax.runtime.xla_flags import backends_initialised

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
GLIBC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
             "MALLOC_TRIM_THRESHOLD_": str(2 ** 62)}
_applied = False


def _glibc():
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module doc); True if it did (now or by
  an earlier call)."""
  global _applied
  if _applied:
    return True
  if os.environ.get("NUWA_JAX_MALLOC_DEFAULTS") == "1" or backends_initialised():
    return False
  libc = _glibc()
  if libc is None:
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # -1 as a size_t is the largest threshold (glibc does not range-check this option).
  _applied = all(libc.mallopt(option, value) == 1 for option, value in (
      (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
  return _applied
