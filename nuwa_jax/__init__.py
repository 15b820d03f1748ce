"""nuwa_jax: NUWA-Infinity in JAX/Flax."""

from nuwa_jax.runtime import xla_flags as _xla_flags

_xla_flags.apply_cpu_defaults()  # before JAX starts its backends (see runtime/xla_flags.py)
