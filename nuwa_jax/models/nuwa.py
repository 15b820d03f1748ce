"""NUWA-Infinity's token-level transformer: one patch at a time, with the Nearby Context Pool.

One call processes one patch of P = patch_rows * patch_cols VQ tokens:

  input     [bos, t_0, ..., t_{P-1}]        (P + 1 positions; learned axial position
                                              embeddings inside the patch)
  logits    position j predicts t_j          (causal self-attention inside the patch)
  memory    each layer also attends to M context entries (patches within the extent), each
            the P cached hidden states that entered this layer when that patch was
            processed (stored normalised, layers.layer_normalize), scaled and projected by
            this layer's LayerNorm and key/value weights (never
            differentiated through), with a learned per-head bias indexed by the entry's
            relative offset (dt, dr, dc) added to their attention logits; invalid entries
            are masked out. Entries come with their offset index (`memory_offset`, the
            compact context of context_pool.Schedule.compact); without it entry k has
            offset k (M = K, one entry per offset)
  text      a transformer text encoder; cross-attention in every block (with a learned
            always-present null token, so that dropping the caption is a valid condition)
  returns   logits [B, P, V] and this patch's hidden states [depth, B, P, D] (positions
            1..P, i.e. after all of its tokens; normalised per row), to be cached in the pool

The positional information between patches is only the relative offset, so the same weights
serve any order and canvas size (see orders.py, context_pool.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nuwa_jax.context_pool import num_offsets
from nuwa_jax.models.layers import (KERNEL_INIT, DecoderStack, Dense, LayerNorm, PoolBias,
                                   partitioned)
from nuwa_jax.runtime.sharding import constrain


def _dtype(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _diagonal_init(value: float):
  """[H, P + 1, P] with `value` where the query predicts the token at the same place (i == m):
  every head starts out favouring the same position of each context patch."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(value * jnp.eye(shape[1], shape[2], dtype=dtype), shape)
  return init


class TextEncoder(nn.Module):
  """Bidirectional transformer over caption ids; prepends a learned null token."""
  vocab: int
  length: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, mask, deterministic: bool = True):
    batch = ids.shape[0]
    table = self.param("embed", partitioned(KERNEL_INIT, "vocab", "embed"),
                       (self.vocab, self.width))
    table = constrain(table, ("vocab", None))
    pos = self.param("pos", partitioned(KERNEL_INIT, "pos", "embed"), (self.length, self.width))
    null = self.param("null", partitioned(KERNEL_INIT, "pos", "embed"), (1, self.width))
    x = jnp.take(table, ids, axis=0) + pos
    x = jnp.concatenate([jnp.broadcast_to(null, (batch, 1, self.width)), x], 1)
    mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask.astype(bool)], 1)
    x = constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))
    x = DecoderStack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype,
                     name="encoder")(x, mask[:, None, None, :], deterministic=deterministic)
    return LayerNorm(dtype=self.dtype, name="ln")(x), mask


class Model(nn.Module):
  """Args (from `config.model`):
    vocab: VQ codebook size; patch_rows, patch_cols: tokens per patch side.
    extent: (e_t, e_h, e_w) of the Nearby Context Pool.
    width, depth, num_heads, mlp_dim, dropout: the transformer.
    text_vocab, text_len, text_depth: caption encoder (text_len 0: no text, no
      cross-attention).
    scan_layers, remat ('none'|'full'|'dots'), dtype ('float32'|'bfloat16'; params f32).
    pool_slots: storage slots of the pool (used by trainers/samplers, not by the module).
    max_context: context entries per step (trainers/samplers; 0: computed from the grids and
      orders trained on, see trainers/nuwa_infinity.context_entries).
  """
  vocab: int
  patch_rows: int
  patch_cols: int
  extent: tuple[int, int, int]
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  text_vocab: int = 0
  text_len: int = 0
  text_depth: int = 2
  scan_layers: bool = True
  remat: str = "none"
  dtype: str = "float32"
  pool_slots: int = 32
  max_context: int = 0

  @property
  def patch_tokens(self) -> int:
    return self.patch_rows * self.patch_cols

  @property
  def num_context(self) -> int:
    return num_offsets(self.extent)

  def encode_text(self, ids, mask, deterministic: bool = True):
    return self.text_encoder(ids, mask, deterministic)

  def setup(self):
    dtype = _dtype(self.dtype)
    pos_init = partitioned(KERNEL_INIT, "pos", "embed")
    self.token_embed = self.param("token_embed", partitioned(KERNEL_INIT, "vocab", "embed"),
                                  (self.vocab, self.width))
    self.bos = self.param("bos", pos_init, (1, self.width))
    self.row_pos = self.param("row_pos", pos_init, (self.patch_rows, self.width))
    self.col_pos = self.param("col_pos", pos_init, (self.patch_cols, self.width))
    # Learned per-head bias for each relative offset of a context patch (the order-aware
    # positional embedding of the Arbitrary Direction Controller).
    self.offset_bias = self.param("offset_bias", partitioned(nn.initializers.zeros, "heads",
                                                             "offsets"),
                                  (self.num_heads, self.num_context))
    # Learned per-head bias between a query position (0..P) and a context token's position
    # inside its patch (0..P-1), shared by all context patches, initialised to favour the same
    # place (ours; the paper only names axial embeddings). Measured on the repeated-half test
    # after 240 updates: the model leans on its context much more (right-half nll with / without
    # the pool 1.34 / 1.91, against 1.35 / 1.51 with a zero initialisation).
    self.align_bias = self.param("align_bias", partitioned(_diagonal_init(2.0), "heads", None,
                                                           None),
                                 (self.num_heads, self.patch_tokens + 1, self.patch_tokens))
    if self.text_len:
      self.text_encoder = TextEncoder(self.text_vocab, self.text_len, self.width,
                                      self.text_depth, self.num_heads, self.mlp_dim, dtype)
    self.decoder = DecoderStack(depth=self.depth, num_heads=self.num_heads,
                                mlp_dim=self.mlp_dim, dropout=self.dropout,
                                cross_attention=bool(self.text_len), scan=self.scan_layers,
                                remat=self.remat, dtype=dtype)
    self.embed_dropout = nn.Dropout(self.dropout)
    self.ln_final = LayerNorm(dtype=dtype)
    self.head = Dense(self.vocab, ("embed", "vocab"), dtype=dtype)

  def embed_tokens(self, tokens):
    """[B, T] tokens at patch positions 0..T-1 → [B, T, D] embeddings (with positions)."""
    table = constrain(self.token_embed, ("vocab", None))
    pos = (self.row_pos[:, None] + self.col_pos[None, :]).reshape(self.patch_tokens, self.width)
    return jnp.take(table, tokens, axis=0) + pos[:tokens.shape[1]]

  def __call__(self, tokens, memory, memory_valid, text=None, text_mask=None,
               train: bool = False, memory_offset=None):
    """One patch, teacher-forced.

    Args:
      tokens: int [B, P] the patch's tokens (targets; the model sees them shifted by one).
      memory: [depth, B, M, P, D] cached hidden states of the M context entries, as this
        call returns them (normalised per row by layers.layer_normalize).
      memory_valid: bool [B, M].
      text, text_mask: int [B, text_len], bool [B, text_len] (only when text_len > 0).
      train: dropout on.
      memory_offset: int [B, M] offset index (0..K-1, context_pool.offset_index) of each
        entry, which picks its offset bias; None: M must be K and entry k has offset k.
    Returns:
      (logits float32 [B, P, vocab], hidden [depth, B, P, D] to cache: each layer's input,
      normalised).
    """
    batch, p = tokens.shape
    if p != self.patch_tokens:
      raise ValueError(f"tokens have {p} positions, expected a {self.patch_rows}x"
                       f"{self.patch_cols} patch.")
    dtype = _dtype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(self.bos, (batch, 1, self.width)),
                         self.embed_tokens(tokens)], axis=1).astype(dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    x = self.embed_dropout(x, deterministic=not train)
    logits, hidden = self._layers(x, memory, memory_valid, text, text_mask, train,
                                  memory_offset)
    return logits[:, :p], hidden[:, :, 1:]

  def _offset_bias(self, memory_offset):
    """[B, H, M] offset bias of each context entry ([1, H, K] without offsets: entry k has
    offset k)."""
    if memory_offset is None:
      return self.offset_bias[None]
    return jnp.take(self.offset_bias, memory_offset, axis=1).transpose(1, 0, 2)

  def _layers(self, x, memory, memory_valid, text, text_mask, train, memory_offset=None):
    """Runs the stack on x [B, T, D] with the context memory; logits and layer inputs."""
    batch, length, _ = x.shape
    depth, _, k, p_mem, _ = memory.shape
    if depth != self.depth or (memory_offset is None and k != self.num_context):
      raise ValueError(f"memory has {depth} layers x {k} entries, expected {self.depth} x "
                       f"{self.num_context} (or pass memory_offset).")
    memory = memory.reshape(depth, batch, k * p_mem, self.width)
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # the patch's own keys
    # The context's mask and bias in factored form (layers.PoolBias): the offset bias of each
    # entry and the alignment bias of each of its tokens, never a [B, H, T, M*P] array.
    pool = PoolBias(memory_valid.astype(bool), self._offset_bias(memory_offset),
                    self.align_bias[:, :length])
    context = context_mask = None
    if self.text_len:
      context, cmask = self.encode_text(text, text_mask, deterministic=not train)
      context_mask = cmask[:, None, None, :]
    x, inputs = self.decoder(x, causal, pool, context, context_mask, memory, not train)
    logits = self.head(self.ln_final(x))
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    return logits, inputs

  # -- Incremental decoding (sampling; see nuwa_jax/sampler.py) -----------------------------
  # The cache of one patch holds, per layer, (k0, v0, k, v), batch and heads merged
  # (layers.merge_heads): the keys and values of the M context entries [B*H, M*P, Dh]
  # (projected once per patch from the pool, read-only) and those of the patch positions
  # [bos, t_0, ..., t_{P-1}] [B*H, P + 1, Dh],
  # written one at a time. A tuple of depth such layers with unrolled layers, stacked with
  # scanned ones (see DecoderStack); samplers use an unrolled model (`unrolled`) and carry
  # only (k, v) through their token loop.

  def context_cache(self, memory):
    """memory [depth, B, M, P, D] → the patch's cache with the context entries filled in."""
    depth, batch, k, p, d = memory.shape
    dtype = _dtype(self.dtype)
    kv = self.decoder(memory.reshape(depth, batch, k * p, d).astype(dtype), None,
                      memory_kv_only=True)
    def with_patch(layer):  # (k0, v0) → (k0, v0, k, v); L is the second last axis
      zeros = [jnp.zeros(a.shape[:-2] + (self.patch_tokens + 1, a.shape[-1]), a.dtype)
               for a in layer]
      return tuple(layer) + tuple(zeros)
    return with_patch(kv) if self.scan_layers else tuple(with_patch(layer) for layer in kv)

  def decode_token(self, cache, j, prev_token, memory_valid, text_context=None,
                   text_context_mask=None, memory_offset=None):
    """Feeds patch position j (bos when j == 0, else token t_{j-1} = `prev_token` [B]).

    Args:
      cache: from `context_cache` (and earlier calls); j: int32 scalar in [0, P].
      memory_valid: bool [B, M]. text_context, text_context_mask: from `encode_text`.
      memory_offset: int [B, M] offset index of each entry (as in `__call__`); None: M = K.
    Returns:
      (logits float32 [B, vocab] predicting t_j, updated cache).
    """
    dtype = _dtype(self.dtype)
    batch = prev_token.shape[0]
    p, k = self.patch_tokens, memory_valid.shape[1]
    pos = (self.row_pos[:, None] + self.col_pos[None, :]).reshape(p, self.width)
    table = constrain(self.token_embed, ("vocab", None))
    emb = jnp.take(table, prev_token, axis=0) + jnp.take(pos, jnp.maximum(j - 1, 0), axis=0)
    x = jnp.where(j == 0, jnp.broadcast_to(self.bos, emb.shape), emb)[:, None].astype(dtype)
    patch_mask = jnp.arange(p + 1) <= j
    mask = jnp.concatenate([jnp.repeat(memory_valid.astype(bool), p, axis=1),
                            jnp.broadcast_to(patch_mask, (batch, p + 1))], axis=1)
    align = jax.lax.dynamic_index_in_dim(self.align_bias, j, axis=1, keepdims=False)  # [H, P]
    offset_bias = self._offset_bias(memory_offset)
    rows = offset_bias.shape[0]
    mem_bias = (offset_bias[:, :, :, None] + align[None, :, None, :]).reshape(
        rows, self.num_heads, k * p)
    bias = jnp.concatenate([mem_bias, jnp.zeros((rows, self.num_heads, p + 1))], axis=2)
    context_mask = None if text_context_mask is None else text_context_mask[:, None, None, :]
    x, cache = self.decoder(x, mask[:, None, None, :], bias[:, :, None, :], text_context,
                            context_mask, cache=cache, cache_index=j)
    logits = self.head(self.ln_final(x))[:, 0]
    return logits.astype(jnp.float32), cache


def unrolled(model: Model, params):
  """(model, params) with the decoder's layers unrolled: a scanned model's stacked layer
  parameters [depth, ...] split into `layer_i` entries (the same function; what incremental
  decoding wants, see DecoderStack). Unrolled models are returned as they are."""
  if not model.scan_layers:
    return model, params
  decoder = dict(params["decoder"])
  stacked = decoder.pop("layers")
  for i in range(model.depth):
    decoder[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return model.clone(scan_layers=False), {**params, "decoder": decoder}
