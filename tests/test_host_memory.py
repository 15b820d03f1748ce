"""runtime/host_memory.py: with glibc keeping freed memory, a compiled step that needs a large
temporary buffer reuses its pages instead of faulting them in again on every call."""

import subprocess
import sys

import pytest

from nuwa_jax.runtime import host_memory

from conftest import REPO, subprocess_env

# A 64 x 257 x 1537 float32 temporary (101 MB, 24 700 pages, as the train step's attention
# logits); the call returns only its row sums. Prints the fewest minor faults of 4 calls.
# XLA:CPU frees a call's temporary a little after the call returns; a call that starts before
# then cannot reuse it (CI under load: every call faulted). The pause between calls makes the
# test about reuse, not about that race (BUILD_NOTES "Build").
CODE = """
import resource, sys, time
from nuwa_jax.runtime import host_memory
print(host_memory.keep_freed_memory())
import jax, jax.numpy as jnp
q, k = jnp.ones((64, 257, 64)) * 0.01, jnp.ones((64, 1537, 64)) * 0.01
f = jax.jit(lambda q, k: jnp.sum(jnp.einsum("bqd,bkd->bqk", q, k), -1)
            + jnp.max(jnp.einsum("bqd,bkd->bqk", q, k * 2.0), -1))
jax.block_until_ready(f(q, k))
faults = []
for _ in range(4):
  time.sleep(0.5)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(q, k))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults), f.lower(q, k).compile().memory_analysis().temp_size_in_bytes // 4096)
"""


def test_kept_memory_stops_the_page_faults_of_a_large_temporary():
  if host_memory._glibc() is None:  # pylint: disable=protected-access
    pytest.skip("not glibc: the setting does not apply")
  results = {}
  for opt_out in ("0", "1"):
    env = dict(subprocess_env(1), NUWA_JAX_MALLOC_DEFAULTS=opt_out)
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    results[opt_out] = (out[0] == "True", int(out[1]), int(out[2]))
  (applied, kept_faults, pages), (not_applied, faults, _) = results["0"], results["1"]
  assert applied and not not_applied
  assert pages > 20000  # the temporary is as large as intended
  assert faults > pages // 2, results  # XLA's buffers come from fresh mmaps by default
  assert kept_faults < pages // 20, results  # and are reused when freed memory is kept
