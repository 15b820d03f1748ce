"""The library's XLA:CPU defaults (nuwa_jax/runtime/xla_flags.py): YNNPACK fusions off on CPUs
without AMX, unless the user chose otherwise; and they take effect in a fresh process."""

import os
import subprocess
import sys

import pytest

from nuwa_jax.runtime import xla_flags

from conftest import REPO, subprocess_env


@pytest.fixture
def fresh(monkeypatch):
  monkeypatch.setattr(xla_flags, "backends_initialised", lambda: False)
  monkeypatch.setattr(xla_flags, "_cpu_has_amx", lambda: False)
  monkeypatch.delenv("NUWA_JAX_XLA_DEFAULTS", raising=False)
  return monkeypatch


def test_adds_the_option_and_keeps_other_flags(fresh):
  fresh.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert xla_flags.apply_cpu_defaults() == xla_flags.YNN_OFF
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     + xla_flags.YNN_OFF)


@pytest.mark.parametrize("case", ["user_flag", "opt_out", "amx", "started"])
def test_leaves_flags_alone(fresh, case):
  fresh.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot"
               if case == "user_flag" else "")
  if case == "opt_out":
    fresh.setenv("NUWA_JAX_XLA_DEFAULTS", "1")
  if case == "amx":
    fresh.setattr(xla_flags, "_cpu_has_amx", lambda: True)
  if case == "started":
    fresh.setattr(xla_flags, "backends_initialised", lambda: True)
  before = os.environ["XLA_FLAGS"]
  assert xla_flags.apply_cpu_defaults() is None
  assert os.environ["XLA_FLAGS"] == before


def test_importing_nuwa_jax_compiles_without_ynn_fusions_in_a_fresh_process():
  """Without AMX, a program that imports nuwa_jax (even after jax) compiles a matmul + reduce
  without YNNPACK fusions; with the opt-out it gets XLA's defaults."""
  code = ("import jax, jax.numpy as jnp, nuwa_jax\n"
          "from nuwa_jax.runtime import xla_flags\n"
          "f = jax.jit(lambda a, b: jnp.sum(jnp.exp(a @ b), -1))\n"
          "hlo = f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()\n"
          "print(xla_flags._cpu_has_amx(), 'ynn_fusion' in hlo)\n")
  outs = []
  for opt_out in ("0", "1"):
    env = dict(subprocess_env(1), NUWA_JAX_XLA_DEFAULTS=opt_out)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    outs.append(out)
  if outs[0][0] == "True":
    pytest.skip("AMX CPU: XLA's defaults are kept")
  assert outs[0][1] == "False", outs
  # XLA's own defaults do use YNN fusions on this jaxlib: the opt-out gets them back.
  assert outs[1][1] == "True", outs
