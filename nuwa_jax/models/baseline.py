"""DALL·E-style baseline: one decoder-only transformer over [text ; image tokens].

The sequence is the caption's token ids, a learned start-of-image embedding, then the image's
VQ tokens in raster order; full causal attention over all of it. The model predicts every
image token from everything before it (text is conditioning only, as in the fixed-size
DALL·E comparisons of the NUWA-Infinity paper). Text and image have separate embedding
tables; image positions get learned row + column embeddings.

The trainer builds it as `Model(**config.model)`; the model never reads the config.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nuwa_jax.models.layers import KERNEL_INIT, DecoderStack, Dense, LayerNorm, partitioned
from nuwa_jax.runtime.sharding import constrain


def _dtype(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Model(nn.Module):
  """Args (all from `config.model`):
    text_vocab: caption vocabulary size (sentencepiece); text_len: caption length (0: none).
    image_vocab: VQ codebook size; image_rows, image_cols: token grid of one image.
    width, depth, num_heads, mlp_dim: transformer size. dropout: residual dropout.
    scan_layers: stack layers with nn.scan; remat: 'none' | 'full' | 'dots'.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters are always float32.
  """
  text_vocab: int
  text_len: int
  image_vocab: int
  image_rows: int
  image_cols: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  scan_layers: bool = True
  remat: str = "none"
  dtype: str = "float32"

  def _embed(self, name, num, ids):
    table = self.param(name, partitioned(KERNEL_INIT, "vocab", "embed"), (num, self.width))
    # FSDP: gather the table's width before the lookup (as for any weight), so the looked-up
    # rows come out batch-sharded instead of width-sharded (which XLA can only reshard by
    # full rematerialisation).
    table = constrain(table, ("vocab", None))
    return constrain(jnp.take(table, ids, axis=0), ("batch", "length", "act_embed"))

  @nn.compact
  def __call__(self, text, image, train: bool = False):
    """Logits for every image token.

    Args:
      text: int [B, text_len] caption ids (0 is padding), ignored when text_len == 0.
      image: int [B, image_rows * image_cols] VQ ids in raster order.
      train: enables dropout.
    Returns:
      float32 [B, image_rows * image_cols, image_vocab]; position n only saw text and
      image[:, :n].
    """
    dtype = _dtype(self.dtype)
    batch, n = image.shape
    if n != self.image_rows * self.image_cols:
      raise ValueError(f"image has {n} tokens, expected {self.image_rows}x{self.image_cols}.")
    pos_init = partitioned(KERNEL_INIT, "pos", "embed")
    parts = []
    if self.text_len:
      text_pos = self.param("text_pos", pos_init, (self.text_len, self.width))
      parts.append(self._embed("text_embed", self.text_vocab, text) + text_pos)
    soi = self.param("start_of_image", pos_init, (1, self.width))
    parts.append(jnp.broadcast_to(soi, (batch, 1, self.width)))
    rows = self.param("image_row_pos", pos_init, (self.image_rows, self.width))
    cols = self.param("image_col_pos", pos_init, (self.image_cols, self.width))
    image_pos = (rows[:, None] + cols[None, :]).reshape(n, self.width)
    parts.append(self._embed("image_embed", self.image_vocab, image[:, :-1]) + image_pos[:-1])
    x = jnp.concatenate(parts, axis=1).astype(dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    x = DecoderStack(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                     dropout=self.dropout, scan=self.scan_layers, remat=self.remat,
                     dtype=dtype, name="decoder")(x, causal, deterministic=not train)
    x = LayerNorm(dtype=dtype, name="ln_final")(x[:, self.text_len:])
    logits = Dense(self.image_vocab, ("embed", "vocab"), dtype=dtype, name="head")(x)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
