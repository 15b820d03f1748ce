"""The Nearby Context Pool on the device: gather a patch's context entries, store a patch.

The pool is [depth, batch, slots, P, width] (each layer's normalised inputs of the cached
patches); which slot holds which patch is decided on the host by `context_pool.make_schedule`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_memory(pool, context_slot):
  """pool [L, B, S, P, D], slots [B, M] → memory [L, B, M, P, D]. Slots are in range by
  construction (context_pool gives invalid entries slot 0): clipped, not checked (the default
  mode fills out-of-range rows with NaN, a select that XLA fuses into every reader)."""
  return jnp.take_along_axis(pool, context_slot[None, :, :, None, None], axis=2, mode="clip")


def write_pool(pool, write_slot, hidden):
  """Stores hidden [L, B, P, D] at each example's slot.

  A bfloat16 pool is scattered as uint16 bits: XLA:CPU has no bf16 scatter and would convert
  the whole pool to float32 and back around it."""
  batch = jnp.arange(pool.shape[1])
  hidden = hidden.astype(pool.dtype)
  if pool.dtype == jnp.bfloat16:
    bits = jax.lax.bitcast_convert_type
    return bits(bits(pool, jnp.uint16).at[:, batch, write_slot].set(bits(hidden, jnp.uint16)),
                jnp.bfloat16)
  return pool.at[:, batch, write_slot].set(hidden)
