"""Transformer building blocks shared by the DALL·E-style baseline and NUWA-Infinity.

Every kernel carries logical axis names (see `nuwa_jax.runtime.sharding`):
  embeddings (vocab, embed); attention q/k/v (embed, heads, kv) and out (heads, kv, embed);
  MLP (embed, mlp) and (mlp, embed); norms (norm,); stacked layers get a leading `layers` axis.
Activations are constrained as (batch, length, act_embed) between blocks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nuwa_jax.runtime.sharding import constrain

Dtype = Any
KERNEL_INIT = nn.initializers.normal(stddev=0.02)
NEG_INF = -1e9


def partitioned(init: Callable, *names: str | None) -> Callable:
  return nn.with_logical_partitioning(init, names)


LAYER_NORM_EPSILON = 1e-6  # LayerNorm's and layer_normalize's


def _ones(n, dtype):
  """A ones vector XLA cannot see through: sums written as dots with it stay dots (XLA:CPU
  runs reductions over long rows as reduce-windows, several times slower)."""
  return jax.lax.optimization_barrier(jnp.ones((n,), dtype))


def column_sums(g):
  """g [..., F] summed over every axis but the last, as a matrix-vector product with a ones
  vector, in float32. The gradient of a bias or a LayerNorm scale: XLA:CPU (jaxlib 0.10.2)
  emits `jnp.sum` over the rows as a tree of reduce-windows, 8x slower for [2056, 2048]
  (12.1 vs 1.5 ms on the 2-core AMD EPYC; bench/README.md)."""
  rows = g.reshape(-1, g.shape[-1])
  return jax.lax.dot_general(_ones(rows.shape[0], rows.dtype), rows, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _row_sums(x):
  """Sum over the last axis of x [..., L] as a matrix-vector product."""
  return jax.lax.dot_general(x, _ones(x.shape[-1], x.dtype), (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def add_bias(y, bias):
  """y [..., F] + bias [F], whose bias gradient is `column_sums` of the cotangent."""
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  return g, column_sums(g).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, dtype):
  """LayerNorm of x [..., D] over its last axis with scale and bias [D], statistics in float32
  (as `layer_normalize`), result in `dtype`. Its VJP takes the scale and bias gradients as
  `column_sums` (XLA:CPU's reductions over rows are slow, see there)."""
  return _layer_norm_fwd(x, scale, bias, dtype)[0]


def _moments(x32, epsilon: float = LAYER_NORM_EPSILON):
  """(mean, 1 / std) of x32 [..., D] over its last axis, keepdims (LayerNorm's statistics)."""
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
  return mean, jax.lax.rsqrt(var + epsilon)


def _layer_norm_fwd(x, scale, bias, dtype):
  x32 = x.astype(jnp.float32)
  mean, rstd = _moments(x32)
  y = (x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(dtype, res, g):
  del dtype
  x, mean, rstd, scale, bias = res
  xhat = (x.astype(jnp.float32) - mean) * rstd  # recomputed from [..., 1] statistics
  g = g.astype(jnp.float32)
  gs = g * scale.astype(jnp.float32)
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  return (dx.astype(x.dtype), column_sums(g * xhat).astype(scale.dtype),
          column_sums(g).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class _Affine(nn.Module):
  """The scale and bias of `LayerNorm` (named as flax's nn.LayerNorm names them)."""
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", partitioned(nn.initializers.ones, "norm"), (d,), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros, "norm"), (d,), self.param_dtype)
    return layer_norm(x, scale, bias, jnp.dtype(self.dtype))


class LayerNorm(nn.Module):
  """LayerNorm (`layer_norm`) whose scale and bias are named (`norm`,) for the sharding rules;
  parameters laid out as flax's nn.LayerNorm's (`LayerNorm_0/{scale, bias}`)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _Affine(self.dtype, self.param_dtype, name="LayerNorm_0")(x)


class Dense(nn.Module):
  """nn.Dense's parameters (`kernel` [in, features], `bias` [features]) with the library's
  dot (`dot_general_for`) and `add_bias`; `axes` are the kernel's logical names (the bias gets
  the second)."""
  features: int
  axes: tuple[str, str]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = KERNEL_INIT

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", partitioned(self.kernel_init, *self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros, self.axes[1]),
                      (self.features,), self.param_dtype)
    dtype = jnp.dtype(self.dtype)
    dot = dot_general_for(dtype) or jax.lax.dot_general
    y = dot(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
    return add_bias(y, bias)


def _transpose_dims(dims, x_ndim, w_ndim):
  """For out = dot_general(x, w, dims): the dims and output permutations of the two transposes.

  Returns ((dx_dims, dx_perm), (dw_dims, dw_perm)) with
    dx = transpose(dot_general(g, w, dx_dims), dx_perm),
    dw = transpose(dot_general(x, g, dw_dims), dw_perm).
  The output of dot_general(x, w, dims) is [batch (in xb order), x free, w free].
  """
  (xc, wc), (xb, wb) = dims
  x_free = [a for a in range(x_ndim) if a not in xc and a not in xb]
  w_free = [a for a in range(w_ndim) if a not in wc and a not in wb]
  nb, nxf = len(xb), len(x_free)
  g_batch = tuple(range(nb))
  g_xfree = tuple(range(nb, nb + nxf))
  g_wfree = tuple(range(nb + nxf, nb + nxf + len(w_free)))
  # dx: [batch, x free, w contracting dims in ascending w order] -> x's axis order.
  dx_dims = ((g_wfree, tuple(w_free)), (g_batch, tuple(wb)))
  wc_sorted = sorted(wc)
  dx_axes = list(xb) + x_free + [xc[list(wc).index(a)] for a in wc_sorted]
  # dw: [batch, x contracting dims in ascending x order, w free] -> w's axis order.
  dw_dims = ((tuple(x_free), g_xfree), (tuple(xb), g_batch))
  xc_sorted = sorted(xc)
  dw_axes = list(wb) + [wc[list(xc).index(a)] for a in xc_sorted] + w_free
  return ((dx_dims, _argsort(dx_axes)), (dw_dims, _argsort(dw_axes)))


def _argsort(axes):
  return tuple(sorted(range(len(axes)), key=lambda i: axes[i]))


def _canonical(dims):
  (xc, wc), (xb, wb) = dims
  return tuple(tuple(int(a) for a in axes) for axes in (xc, wc)), tuple(
      tuple(int(a) for a in axes) for axes in (xb, wb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _f32_acc_dot(x, w, dims, out_dtype):
  """dot_general accumulating in float32, result in `out_dtype`; see its VJP below."""
  return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(out_dtype)


def _f32_acc_dot_fwd(x, w, dims, out_dtype):
  return _f32_acc_dot(x, w, dims, out_dtype), (x, w)


def _f32_acc_dot_bwd(dims, out_dtype, res, g):
  """Both transposes accumulate in f32 with the cotangent in the operands' dtype; float32
  weight gradients without batch dims go through `weight_grad` (an NN product)."""
  del out_dtype
  x, w = res
  (dx_dims, dx_perm), (dw_dims, dw_perm) = _transpose_dims(dims, x.ndim, w.ndim)
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, dx_dims, preferred_element_type=jnp.float32)
  if x.dtype == jnp.float32 and not dims[1][0]:
    dw = weight_grad(x, g, dims)
  else:
    dw = jnp.transpose(jax.lax.dot_general(x, g, dw_dims, preferred_element_type=jnp.float32),
                       dw_perm)
  return jnp.transpose(dx, dx_perm).astype(x.dtype), dw.astype(w.dtype)


_f32_acc_dot.defvjp(_f32_acc_dot_fwd, _f32_acc_dot_bwd)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     out_dtype=None):
  """`lax.dot_general` for bfloat16 operands that accumulates in float32 in the forward pass
  *and* in both transposes of the backward pass (custom VJP; the cotangent is rounded to
  bfloat16 first). XLA:CPU runs bf16 x bf16 -> f32 dots on its fast (AMX/oneDNN) path, while
  bf16 x bf16 -> bf16 dots and the mixed f32 x bf16 dots of the automatic transpose take a slow
  path (measured 5x slower at 2048^3; bench/README.md). The result is `out_dtype` (default the
  operands' dtype, bfloat16). Other dtypes: plain `lax.dot_general`.
  """
  if not lhs.dtype == rhs.dtype == jnp.bfloat16:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type=preferred_element_type)
  out_dtype = out_dtype or preferred_element_type or jnp.bfloat16
  return _f32_acc_dot(lhs, rhs, _canonical(dimension_numbers), jnp.dtype(out_dtype))


def weight_grad(x, g, dims):
  """The second operand's gradient of out = dot_general(x, w, dims) (no batch dims), from
  the cotangent g, with x's contracting axes (w's input axes) moved first and materialised:
  the product then contracts x's trailing (row) axes with g's leading ones, an NN matrix
  product. Autodiff's form contracts both operands' leading axes (TN). XLA's YNNPACK dots
  (XLA:CPU's default, which the library keeps on CPUs with AMX) run that form slower: for
  [2056, 512]^T x [2056, 2048], 47-52 ms TN against 34-38 ms transposed first (2 threads,
  AMD EPYC). With the library's default on other CPUs (Eigen dots, `runtime/xla_flags.py`)
  both forms take the same time (~51 ms), and the train step was unchanged side by side
  (bench/README.md: an earlier microbenchmark that showed 123 vs 57 ms had run YNN dots by
  mistake). Exact: the same sums. When x is larger than g, g is transposed instead and the
  product gives dw^T (also NN)."""
  dims = _canonical(dims)
  (xc, _), (xb, _) = dims
  if xb:
    raise ValueError("weight_grad: dots with batch dimensions are not supported.")
  x_free = [a for a in range(x.ndim) if a not in xc]
  nxf, nwf = len(x_free), g.ndim - len(x_free)  # g is [x free, w free]
  _, (_, dw_perm) = _transpose_dims(dims, x.ndim, len(xc) + nwf)
  if x.size > g.size:  # transpose the smaller g instead: dw^T = g^T x, NN as well
    gt = jax.lax.optimization_barrier(jnp.transpose(g, tuple(range(nxf, g.ndim))
                                                    + tuple(range(nxf))))
    dwt = jax.lax.dot_general(gt, jnp.transpose(x, x_free + sorted(xc)),
                              ((tuple(range(nwf, gt.ndim)), tuple(range(nxf))), ((), ())),
                              preferred_element_type=jnp.float32)  # [w free, xc]
    dw = jnp.transpose(dwt, tuple(range(nwf, dwt.ndim)) + tuple(range(nwf)))
  else:
    xt = jax.lax.optimization_barrier(jnp.transpose(x, sorted(xc) + x_free))
    dw = jax.lax.dot_general(xt, g, ((tuple(range(len(xc), x.ndim)), tuple(range(nxf))),
                                     ((), ())),
                             preferred_element_type=jnp.float32)
  return jnp.transpose(dw, dw_perm)


def f32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` of float32 Dense/DenseGeneral layers (no batch dimensions) whose
  backward pass takes the weight gradient as `weight_grad` does (an NN product after one
  transpose of the input; faster than autodiff's TN form with YNNPACK dots, the same with
  Eigen's, see there). Other dtypes or dots with batch dimensions: plain `lax.dot_general`."""
  dims = _canonical(dimension_numbers)
  if not lhs.dtype == rhs.dtype == jnp.float32 or dims[1][0]:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type=preferred_element_type)
  return _f32_acc_dot(lhs, rhs, dims, jnp.dtype(jnp.float32))


def dot_general_for(dtype) -> Callable | None:
  """The `dot_general` of Dense/DenseGeneral layers computing in `dtype`: bf16_dot_general for
  bfloat16, f32_dot_general for float32, None (Flax's default `lax.dot_general`) otherwise."""
  return {jnp.dtype(jnp.bfloat16): bf16_dot_general,
          jnp.dtype(jnp.float32): f32_dot_general}.get(jnp.dtype(dtype))


# [B, Lq, H, D] x [B, Lk, H, D] -> [B, H, Lq, Lk]; [B, H, Lq, Lk] x [B, Lk, H, D] -> [B, H, Lq, D]
LOGITS_DIMS = (((3,), (3,)), ((0, 2), (0, 2)))
VALUES_DIMS = (((3,), (1,)), ((0, 1), (0, 2)))
# the same with feature-major keys / values [B, H, D, Lk] (memory_projection's layout)
MEMORY_LOGITS_DIMS = (((3,), (2,)), ((0, 2), (0, 1)))
MEMORY_VALUES_DIMS = (((3,), (3,)), ((0, 1), (0, 1)))


def _logits_dot(a, b, dims):
  """float32 result of an attention dot; bf16 operands accumulate in f32 in both passes."""
  if a.dtype == b.dtype == jnp.bfloat16:
    return bf16_dot_general(a, b, dims, out_dtype=jnp.float32)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def dot_product_attention(q, k, v, mask=None, bias=None):
  """Softmax attention over q [B, Lq, H, D] and k, v [B, Lk, H, D].

  Args:
    mask: boolean, broadcastable to [B, H, Lq, Lk]; False blocks attention.
    bias: additive logits bias broadcastable to [B, H, Lq, Lk].
  Returns:
    [B, Lq, H, D]. Softmax is computed in float32 whatever the input dtype.
  """
  depth = q.shape[-1]
  bf16 = q.dtype == k.dtype == v.dtype == jnp.bfloat16
  logits = _logits_dot(q, k, LOGITS_DIMS)  # f32 accumulation in both passes for bf16
  logits = logits / jnp.sqrt(depth).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if bf16:
    out = bf16_dot_general(weights, v, VALUES_DIMS)  # [B, H, Lq, D]
    return jnp.transpose(out, (0, 2, 1, 3))
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class PoolBias(NamedTuple):
  """The mask and logits bias of attention over [memory; the current tokens] in factored form
  (`pool_attention`): memory = M entries of P rows each.

  valid: bool [B, M], entries that exist; offset: [B or 1, H, M] per-head bias of each entry
  (its relative offset); align: [H, T, P] per-head bias between query t and row p of every
  entry. The current tokens get no bias; their mask is Attention's `mask`."""
  valid: jax.Array
  offset: jax.Array
  align: jax.Array


@jax.custom_vjp
def _add_pool_bias(logits, offset, align):
  """logits [B, H, T, M, P] + offset [B, H, M] (per entry; pool_attention folds validity
  into it, so it always has the batch) + align [H, T, P] (per row of an entry). The backward
  pass sums the cotangent for the two biases with matrix-vector products (autodiff's
  reductions over batch and entries were ~15% of the train step)."""
  return logits + offset[:, :, None, :, None] + align[None, :, :, None, :]


def _add_pool_bias_fwd(logits, offset, align):
  return _add_pool_bias(logits, offset, align), (offset, align)


def _add_pool_bias_bwd(res, g):
  offset, align = res
  b, h, t, m, p = g.shape
  # d_offset[b, h, m] = sum over t, p: per (b, h) the ones row times [T, M*P].
  ones_t = jnp.broadcast_to(_ones(t, g.dtype)[None, None], (b * h, 1, t))
  per_row = jax.lax.dot_general(ones_t, g.reshape(b * h, t, m * p), (((2,), (1,)), ((0,), (0,))))
  d_offset = jnp.sum(per_row.reshape(b, h, m, p), axis=3)
  # d_align[h, t, p] = sum over b, m: the ones row times [B, H*T*M*P], then over M (small).
  d_align = jnp.sum(column_sums(g.reshape(b, h * t * m * p)).reshape(h, t, m, p), axis=2)
  return g, d_offset.astype(offset.dtype), d_align.astype(align.dtype)


_add_pool_bias.defvjp(_add_pool_bias_fwd, _add_pool_bias_bwd)


def pool_attention(q, k_memory, v_memory, k, v, pool: PoolBias, mask=None):
  """`dot_product_attention` of q [B, T, H, D] over [memory; current] keys, with the bias
  and validity of the memory given factored (`PoolBias`) instead of as [B, H, T, M*P + T]
  arrays, and the two key parts kept apart: no concatenation of keys, values or logits, and
  no bias tensor of the logits' size whose gradient has to be reduced over batch and layers
  (a profile of the NUWA train step put ~15% of op time there). One softmax over both parts,
  normalised after the values (an op less on the [B, H, T, M*P] tensors).

  The softmax subtracts a per-query shift (no gradient: softmax does not depend on it) that
  is the exact maximum over the current keys but, over the memory, an upper bound taken from
  the unbiased logits: max over entries of (max over the entry's rows of q.k + the entry's
  offset bias) + the alignment bias's max over rows. Its excess over the true maximum is at
  most the spread of that query's alignment-bias row (max - min over P; 2.0 at
  initialisation), so exp neither overflows nor, unless the spread reaches ~80 in float32,
  underflows. Maximising the biased logits instead made XLA:CPU write them out once more
  and reduce them as reduce-windows (~30 ms against ~7 ms a layer for [8, 8, 257, 1280],
  2-core AMD EPYC; bench/README.md).

  k_memory, v_memory: [B, H, D, M*P] (feature-major, as `memory_projection` gives them: the
  dots then need no transpose of the memory's keys and values, and their gradients come out
  in that layout); k, v: [B, T, H, D]; mask: the current keys' mask,
  broadcastable to [B, H, T, T] (e.g. causal). Returns [B, T, H, D]."""
  b, t, h, d = q.shape
  m = pool.valid.shape[1]
  if m == 0:  # no context entries (extent 0): the patch alone
    return dot_product_attention(q, k, v, mask=mask)
  p = k_memory.shape[3] // m
  scale = 1.0 / float(d) ** 0.5
  raw = _logits_dot(q, k_memory, MEMORY_LOGITS_DIMS).reshape(b, h, t, m, p)
  # Invalid entries get NEG_INF in their per-entry bias: no select on the logits (nor on
  # their gradient, which is exactly zero there as their softmax weights are).
  offset = pool.offset.astype(jnp.float32) + jnp.where(pool.valid, 0.0, NEG_INF)[:, None, :]
  align = pool.align.astype(jnp.float32)
  bound = (jnp.max(jnp.max(raw, axis=4) * scale + offset[:, :, None, :], axis=3)
           + jnp.max(align, axis=2)[None])  # >= the biased maximum, see above
  mem = _add_pool_bias(raw * scale, offset, align)
  own = _logits_dot(q, k, LOGITS_DIMS) * scale
  if mask is not None:
    own = jnp.where(mask, own, NEG_INF)
  top = jax.lax.stop_gradient(jnp.maximum(bound, jnp.max(own, axis=3)))
  mem = jnp.exp(mem - top[..., None, None]).reshape(b, h, t, m * p)
  own = jnp.exp(own - top[..., None])
  total = _row_sums(mem) + jnp.sum(own, axis=3)  # [B, H, T]
  out = (_logits_dot(mem.astype(v_memory.dtype), v_memory, MEMORY_VALUES_DIMS)
         + _logits_dot(own.astype(v.dtype), v, VALUES_DIMS)) / total[..., None]
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def layer_normalize(x, epsilon: float = LAYER_NORM_EPSILON):
  """`LayerNorm`'s normalisation (before scale and bias), in float32."""
  x = x.astype(jnp.float32)
  mean, rstd = _moments(x, epsilon)
  return (x - mean) * rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def memory_projection(xhat, scale, bias, kernel, dtype):
  """(xhat * scale + bias) @ kernel, the keys or values of a layer's memory rows, returned
  feature-major: [B, H, Dh, M] (the layout `pool_attention` reads).

  xhat [B, M, D] are the memory rows normalised by `layer_normalize` (the pool stores them so:
  no normalisation per layer and step) and get no gradient (the pool's entries are never
  differentiated through); scale, bias [D] are the layer's LayerNorm and kernel [D, H, Dh] its
  key or value projection, which do. The LayerNorm is folded into the kernel,
  (scale * kernel)^T xhat^T + bias @ kernel, and the product is taken per example with the
  [H*Dh, D] kernel broadcast over the batch, so the keys come out [H*Dh, M] per example: no
  transpose of the M rows anywhere (XLA:CPU otherwise transposes the keys for the head-major
  attention dots and xhat for the weight gradient). The backward pass computes
  A = sum_b g_b xhat_b [H*Dh, D] (NN products) and derives from it
  d_kernel = scale * A + bias * sum(g), d_scale = sum(A * kernel) and
  d_bias = sum(sum(g) * kernel): the input gradient of the M rows (as costly as d_kernel;
  autodiff of a projection of [memory; x] computes it and throws it away) is never formed.
  Dots in `dtype` with float32 accumulation.
  """
  b, m, d = xhat.shape
  _, h, dh = kernel.shape
  w = scale.astype(jnp.float32)[:, None, None] * kernel.astype(jnp.float32)
  w = jnp.broadcast_to(w.reshape(d, h * dh).T.astype(dtype), (b, h * dh, d))
  shift = jnp.einsum("d,dhk->hk", bias.astype(jnp.float32), kernel.astype(jnp.float32))
  out = jax.lax.dot_general(w, xhat.astype(dtype), (((2,), (2,)), ((0,), (0,))),
                            preferred_element_type=jnp.float32)  # [B, H*Dh, M]
  return (out.reshape(b, h, dh, m) + shift[None, :, :, None]).astype(dtype)


def _memory_projection_fwd(xhat, scale, bias, kernel, dtype):
  return memory_projection(xhat, scale, bias, kernel, dtype), (xhat, scale, bias, kernel)


def _memory_projection_bwd(dtype, res, g):
  xhat, scale, bias, kernel = res
  b, m, d = xhat.shape
  _, h, dh = kernel.shape
  g = g.astype(dtype).reshape(b, h * dh, m)
  per_example = jax.lax.dot_general(g, xhat.astype(dtype), (((2,), (1,)), ((0,), (0,))),
                                    preferred_element_type=jnp.float32)  # [B, H*Dh, D]
  # Sums over the batch and rows as matrix-vector products (XLA:CPU runs long reductions as
  # trees of reduce-windows: 32 ms single-core for this g_sum at the bench size).
  a = column_sums(per_example.reshape(b, h * dh * d)).reshape(h * dh, d).T.reshape(d, h, dh)
  g_sum = jnp.sum(_row_sums(g.astype(jnp.float32)), axis=0).reshape(h, dh)  # [H, Dh]
  w = kernel.astype(jnp.float32)
  d_kernel = scale.astype(jnp.float32)[:, None, None] * a + bias.astype(
      jnp.float32)[:, None, None] * g_sum
  return (jnp.zeros_like(xhat), jnp.sum(a * w, axis=(1, 2)).astype(scale.dtype),
          jnp.sum(w * g_sum, axis=(1, 2)).astype(bias.dtype), d_kernel.astype(kernel.dtype))


memory_projection.defvjp(_memory_projection_fwd, _memory_projection_bwd)


def cached_attention(q, keys, values, mask=None, bias=None):
  """`dot_product_attention` of few queries q [B, Lq, H, D] over cached keys and values with
  batch and heads merged, each given in parts (k_i, v_i [B*H, L_i, D], concatenated along L:
  mask and bias [B or 1, H or 1, Lq, sum L_i] cover them all), read where they lie: no
  transpose of L x D per head per step, as the token-major layout needs, and no
  concatenation of the parts. One batch axis, because XLA:CPU copies a loop-carried
  [B, H, L, D] buffer (several times) every step when a batched dot reads it after an
  in-place update; [B*H, L, D] it updates in place. float32 softmax; returns [B, Lq, H, D]."""
  b, lq, h, d = q.shape
  merge = lambda a: jnp.broadcast_to(a, (b, h) + a.shape[2:]).reshape((b * h,) + a.shape[2:])  # noqa: E731
  qh = jnp.swapaxes(q, 1, 2).reshape(b * h, lq, d)  # small
  logits = jnp.concatenate([jax.lax.dot_general(
      qh.astype(k.dtype), k, (((2,), (2,)), ((0,), (0,))),
      preferred_element_type=jnp.float32) for k in keys], axis=-1)
  logits = logits / jnp.sqrt(d).astype(jnp.float32)
  if bias is not None:
    logits = logits + merge(bias.astype(jnp.float32))
  if mask is not None:
    logits = jnp.where(merge(mask), logits, NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1)
  out, start = 0.0, 0
  for v in values:
    w = jax.lax.slice_in_dim(weights, start, start + v.shape[1], axis=2).astype(v.dtype)
    out = out + jax.lax.dot_general(w, v, (((2,), (1,)), ((0,), (0,))),
                                    preferred_element_type=jnp.float32)  # [B*H, Lq, D]
    start += v.shape[1]
  return jnp.swapaxes(out.reshape(b, h, lq, d), 1, 2).astype(q.dtype)


def merge_heads(a):
  """Keys or values [B, L, H, D] → the cache layout [B*H, L, D] (`cached_attention`)."""
  b, l, h, d = a.shape
  return jnp.swapaxes(a, 1, 2).reshape(b * h, l, d)


class Attention(nn.Module):
  """Multi-head attention; self-attention when `kv` is None, else cross-attention."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, name):
    return nn.DenseGeneral((self.num_heads, self.head_dim), axis=-1, use_bias=False,
                           dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                           dot_general=dot_general_for(self.dtype),
                           kernel_init=partitioned(KERNEL_INIT, "embed", "heads", "kv"))

  def _memory_kv(self, memory, token_major: bool = False):
    """memory = (xhat, scale, bias): this layer's keys and values of its memory rows,
    feature-major [B, H, Dh, M] (`memory_projection`), or [B, M, H, Dh] with token_major."""
    out = []
    for name in ("key", "value"):
      kernel = nn.meta.unbox(getattr(self, name).variables["params"]["kernel"])
      a = constrain(memory_projection(*memory, kernel, jnp.dtype(self.dtype)),
                    ("batch", "act_heads", "act_kv", "length"))
      out.append(jnp.transpose(a, (0, 3, 1, 2)) if token_major else a)
    return tuple(out)

  def setup(self):
    self.query, self.key, self.value = (self._dense(n) for n in ("query", "key", "value"))
    self.out = nn.DenseGeneral(
        self.num_heads * self.head_dim, axis=(-2, -1), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, dot_general=dot_general_for(self.dtype),
        kernel_init=partitioned(KERNEL_INIT, "heads", "kv", "embed"))

  def __call__(self, x, kv=None, mask=None, bias=None, cache=None, cache_index=None,
               memory=None, kv_only: bool = False):
    """Args:
      x: [B, Lq, D] queries (and keys/values when `kv` is None).
      cache: (k, v) [B*H, M, Dh] (`merge_heads`) already-projected keys and values
        (incremental decoding); the keys and values of x are written into it at
        `cache_index` and the queries attend to the whole cache (mask/bias cover M) without
        moving it. Returns (out, cache) then. Or (k0, v0, k, v): read-only keys and values
        k0, v0 [B*H, C, Dh] (a segment's context) before the written ones (mask and bias
        cover C + M): a decoding loop then carries only the small written part (XLA:CPU
        copies loop-carried buffers that it updates and feeds to a dot, every step).
      memory: (xhat [B, M, D], scale [D], bias [D]): M memory rows, normalised by
        `layer_normalize`, and the LayerNorm scale and bias that x went through; their keys and
        values (`memory_projection`, no gradient into xhat) go before those of x.
      kv_only: return this layer's (keys, values) of `memory` only, in the cache layout
        [B*H, M, Dh] (to fill a cache).
    """
    if kv_only:  # [B, H, Dh, M] -> [B*H, M, Dh]
      return tuple(merge_heads(a) for a in self._memory_kv(memory, token_major=True))
    kv = x if kv is None else kv
    q = constrain(self.query(x), ("batch", "length", "act_heads", "act_kv"))
    k = constrain(self.key(kv), ("batch", "length", "act_heads", "act_kv"))
    v = constrain(self.value(kv), ("batch", "length", "act_heads", "act_kv"))
    if memory is not None and isinstance(bias, PoolBias):
      out = pool_attention(q, *self._memory_kv(memory), k, v, bias, mask)
      return constrain(self.out(out), ("batch", "length", "act_embed"))
    if memory is not None:
      k_memory, v_memory = self._memory_kv(memory, token_major=True)
      k = jnp.concatenate([k_memory, k], axis=1)
      v = jnp.concatenate([v_memory, v], axis=1)
    if cache is not None:
      fixed, written = cache[:-2], tuple(jax.lax.dynamic_update_slice_in_dim(
          c, merge_heads(a).astype(c.dtype), cache_index, 1)
                                         for c, a in zip(cache[-2:], (k, v)))
      cache = fixed + written
      out = cached_attention(q, cache[0::2], cache[1::2], mask=mask, bias=bias)
    else:
      out = dot_product_attention(q, k, v, mask=mask, bias=bias)
    out = constrain(self.out(out), ("batch", "length", "act_embed"))
    return out if cache is None else (out, cache)


class Mlp(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.mlp_dim, ("embed", "mlp"), name="wi", **kw)(x)
    h = constrain(nn.gelu(h), ("batch", "length", "act_mlp"))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    out = Dense(width, ("mlp", "embed"), name="wo", **kw)(h)
    return constrain(out, ("batch", "length", "act_embed"))


class DecoderBlock(nn.Module):
  """Pre-norm block: self-attention, optional cross-attention to a context, MLP.

  `memory` [B, M, D] (Transformer-XL style): hidden states of other segments that this
  layer's self-attention also attends to, given normalised (`layer_normalize`: what
  DecoderStack returns), scaled and projected by this layer's own LayerNorm and key/value
  weights and placed before the current tokens; `mask` and `bias` then cover M + T keys. No
  gradient flows into `memory` itself.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  cross_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @staticmethod
  def _memory(ln_self, memory):
    """(memory rows, ln_self's scale, bias): what Attention(memory=) projects. The rows come
    normalised (`layer_normalize`, as DecoderStack returns its layer inputs)."""
    params = nn.meta.unbox(ln_self.variables["params"]["LayerNorm_0"])
    return jax.lax.stop_gradient(memory), params["scale"], params["bias"]

  @nn.compact
  def __call__(self, x, mask, bias=None, context=None, context_mask=None, memory=None,
               deterministic: bool = True, cache=None, cache_index=None,
               memory_kv_only: bool = False):
    """Incremental decoding: `cache` (k, v) [B*H, M, Dh] of this layer, x the new positions
    (written at `cache_index`), returns (x, cache). `memory_kv_only`: returns the keys and
    values this layer's self-attention would compute from `x` used as memory."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    head_dim = x.shape[-1] // self.num_heads
    drop = functools.partial(nn.Dropout(self.dropout), deterministic=deterministic)
    ln_self = LayerNorm(name="ln_self", **kw)
    attention = Attention(self.num_heads, head_dim, name="self_attention", **kw)
    if memory_kv_only:  # x is the memory
      return attention(None, memory=self._memory(ln_self, x), kv_only=True)
    h = ln_self(x)
    if memory is not None:
      memory = self._memory(ln_self, memory)
    h = attention(h, mask=mask, bias=bias, cache=cache, cache_index=cache_index, memory=memory)
    if cache is not None:
      h, cache = h
    x = x + drop(h)
    if self.cross_attention:
      h = Attention(self.num_heads, head_dim, name="cross_attention", **kw)(
          LayerNorm(name="ln_cross", **kw)(x), kv=context, mask=context_mask)
      x = x + drop(h)
    h = Mlp(self.mlp_dim, self.dropout, name="mlp", **kw)(LayerNorm(name="ln_mlp", **kw)(x),
                                                          deterministic)
    x = x + drop(h)
    x = constrain(x, ("batch", "length", "act_embed"))
    return x if cache is None else (x, cache)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderStack(nn.Module):
  """`depth` DecoderBlocks, optionally stacked with `nn.scan` and rematerialised.

  With `scan=True` the parameters of all layers are stacked along a leading `layers` axis
  and the block is compiled once, which keeps compile time flat in depth.

  With `memory` [depth, B, M, D] (one per layer, normalised rows), returns
  `(x, layer_inputs)` where layer_inputs [depth, B, T, D] are the hidden states entering each
  layer, normalised by `layer_normalize` (in x's dtype): what a later segment will attend to
  as its memory. Normalised once here, each row is not normalised again by every later
  segment that reads it.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  cross_attention: bool = False
  scan: bool = True
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, bias=None, context=None, context_mask=None, memory=None,
               deterministic: bool = True, cache=None, cache_index=None,
               memory_kv_only: bool = False):
    """Training / teacher forcing: `(x, mask, bias, context, context_mask, memory)`.

    Incremental decoding (inference only, no remat): `cache` holds each layer's (k, v)
    [B*H, M, Dh] (`merge_heads`) — a tuple of `depth` pairs when the layers are unrolled (each
    written in place: use this for sampling), one stacked pair [depth, B*H, M, Dh] when they
    are scanned (every step then copies the layer slices in and out) —, x [B, T, D] the new
    positions written at `cache_index`; returns (x, cache).
    `memory_kv_only`: x is memory [depth, B, M, D]; returns each layer's (k, v) of it in the
    cache's form (to fill a cache once and reuse it for many decoding steps).
    """
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}.")
    block = DecoderBlock
    if self.remat != "none" and cache is None and not memory_kv_only:
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat], static_argnums=(7,))
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
              cross_attention=self.cross_attention, dtype=self.dtype,
              param_dtype=self.param_dtype)
    if cache is not None or memory_kv_only:
      return self._inference(block, kw, x, mask, bias, context, context_mask, cache,
                             cache_index, memory_kv_only)

    def apply(module, carry, layer_memory):
      return module(carry, mask, bias, context, context_mask, layer_memory, deterministic)

    def normed(h):  # a layer input as later segments' memory
      return layer_normalize(jax.lax.stop_gradient(h)).astype(h.dtype)

    if self.scan:
      def body(module, carry, layer_memory):
        return apply(module, carry, layer_memory), None if memory is None else normed(carry)
      scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                       "dropout": True},
                        length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, inputs = scanned(block(name="layers", **kw), x, memory)
    else:
      inputs = []
      for i in range(self.depth):
        inputs.append(normed(x))
        x = apply(block(name=f"layer_{i}", **kw), x, None if memory is None else memory[i])
      inputs = jnp.stack(inputs)
    return x if memory is None else (x, inputs)

  def _inference(self, block, kw, x, mask, bias, context, context_mask, cache, cache_index,
                 memory_kv_only):
    """The layer loop of incremental decoding / memory projection (see __call__)."""
    def apply(module, carry, layer):
      if memory_kv_only:
        return carry, module(layer, None, memory_kv_only=True)
      return module(carry, mask, bias, context, context_mask, None, True, cache=layer,
                    cache_index=cache_index)

    xs = x if memory_kv_only else cache
    carry = None if memory_kv_only else x
    if self.scan:
      scanned = nn.scan(apply, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      carry, ys = scanned(block(name="layers", **kw), carry, xs)
    else:
      outs = []
      for i in range(self.depth):
        layer = jax.tree.map(lambda a, i=i: a[i], xs) if memory_kv_only else xs[i]
        carry, y = apply(block(name=f"layer_{i}", **kw), carry, layer)
        outs.append(y)
      ys = tuple(outs)  # per layer: no stacking (a copy of the whole cache every step)
    return ys if memory_kv_only else (carry, ys)
