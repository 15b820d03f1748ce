"""Taming-style VQGAN tokenizer: convolutional encoder, vector quantizer, decoder.

The architecture follows taming-transformers (`taming/modules/diffusionmodules/model.py`):
per resolution level `num_res_blocks` resnet blocks (GroupNorm(32) + swish + 3x3 conv, twice,
1x1 shortcut when the width changes), self-attention blocks at the feature resolutions listed
in `attn_resolutions` (relative to the nominal `resolution`), a stride-2 3x3 downsampling conv
with taming's asymmetric (0, 1) padding between encoder levels, nearest-neighbour upsampling +
3x3 conv between decoder levels (computed as four 2x2 convs at the low resolution, see
`Upsample`), num_res_blocks + 1 blocks per decoder level, a middle of resnet / attention /
resnet, and 1x1 quant_conv / post_quant_conv around the quantizer.
The downsampling factor is f = 2 ** (len(ch_mult) - 1). Parameter shapes and counts equal
taming's (29.4M encoder + quant_conv, 42.5M decoder + post_quant_conv at ch 128).

Images are float in [-1, 1], NHWC. Videos are tokenised frame by frame (`fold_frames`).

Sharding: conv kernels are [kh, kw, in, out] with logical names (None, None, conv_in,
conv_out) and biases (conv_out,); the output layer's out axis (3 channels) is unnamed. Norm
parameters are (norm,), the trainable codebook (vocab, embed). `LOGICAL_RULES` gives the rules
for the two new names: conv_in replicated, conv_out over fsdp (ZeRO-3 style: each conv
kernel is gathered before use). Activations are constrained to (batch, ., ., .) between
levels, i.e. pure data parallelism over the batch.

`norm="pixel"` (statistics over the channels of each pixel rather than per image) and
`mid_attention=False` give a decoder whose receptive field is local, which tiled decoding
reproduces exactly (`nuwa_jax.tiled_decode`); taming's GroupNorm and attention are global
within a tile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nuwa_jax.models.layers import partitioned
from nuwa_jax.models.quantizer import STATS, VectorQuantizer
from nuwa_jax.runtime.sharding import constrain

Dtype = Any
# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), ...).
CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
NORMS = ("group", "pixel", "none")
LOGICAL_RULES = (("conv_in", None), ("conv_out", "fsdp"))
ACT = ("batch", None, None, None)


def compute_dtype(name: str | Dtype) -> Dtype:
  if isinstance(name, str):
    if name not in ("float32", "bfloat16"):
      raise ValueError(f"dtype={name!r}: expected 'float32' or 'bfloat16'.")
    return jnp.dtype(name)
  return name


# bfloat16 convs accumulate and return float32: XLA:CPU runs them about twice as fast as
# bf16-out convs, and every conv output goes into a float32 norm or residual sum anyway.
_CONV_F32_OUT = functools.partial(jax.lax.conv_general_dilated,
                                  preferred_element_type=jnp.float32)


def conv(features: int, kernel: int = 3, stride: int = 1, padding: Any = "SAME",
         dtype: Dtype = jnp.float32, out_axis: str | None = "conv_out",
         name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 conv_general_dilated=_CONV_F32_OUT if dtype == jnp.bfloat16 else None,
                 kernel_init=partitioned(CONV_INIT, None, None, "conv_in", out_axis),
                 bias_init=partitioned(nn.initializers.zeros, out_axis))


class Norm(nn.Module):
  """GroupNorm(32, eps=1e-6) with statistics in float32.

  kind: 'group' normalises each group over (H, W, channels of the group) as taming does;
  'pixel' over all channels at each pixel (a LayerNorm over channels: local, so tiles decode
  exactly); 'none' is the identity.

  The 'group' statistics are per-channel sums over H, W (channels stay the contiguous minor
  axis, which XLA:CPU reduces about twice as fast as a [.., G, C/G] reshape), combined per
  group afterwards; the sums are taken around a per-group shift (the group's mean at the
  first pixel) so that E[x^2] - E[x]^2 does not cancel when |mean| >> std.
  """
  kind: str = "group"
  groups: int = 32
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind == "none":
      return x
    c = x.shape[-1]
    groups = min(self.groups, c) if self.kind == "group" else 1
    if c % groups:
      raise ValueError(f"Norm: {c} channels do not split into {groups} groups.")
    scale = self.param("scale", partitioned(nn.initializers.ones, "norm"), (c,), jnp.float32)
    bias = self.param("bias", partitioned(nn.initializers.zeros, "norm"), (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.kind == "pixel":
      mean = jnp.mean(xf, -1, keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
      return (y * scale + bias).astype(self.dtype)
    b, per = x.shape[0], c // groups
    spatial = tuple(range(1, x.ndim - 1))
    bcast = lambda v: v.reshape((b,) + (1,) * len(spatial) + (c,))  # [B, C] -> [B, 1.., C]
    first = xf[(slice(None),) + (0,) * len(spatial)]  # [B, C]
    shift = jnp.repeat(first.reshape(b, groups, per).mean(-1), per, -1)
    d = xf - bcast(jax.lax.stop_gradient(shift))
    n = per * math.prod(x.shape[1:-1])
    m1 = jnp.sum(d, spatial).reshape(b, groups, per).sum(-1) / n  # [B, G]
    m2 = jnp.sum(d * d, spatial).reshape(b, groups, per).sum(-1) / n
    inv = jax.lax.rsqrt(jnp.maximum(m2 - m1 * m1, 0.0) + self.eps)
    mul = jnp.repeat(inv, per, -1) * scale  # [B, C]
    add = bias - (jnp.repeat(m1, per, -1) + jax.lax.stop_gradient(shift)) * mul
    return (xf * bcast(mul) + bcast(add)).astype(self.dtype)


class ResnetBlock(nn.Module):
  out_ch: int
  norm: str = "group"
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.swish(Norm(self.norm, self.groups, dtype=self.dtype, name="norm1")(x))
    h = conv(self.out_ch, dtype=self.dtype, name="conv1")(h)
    h = nn.swish(Norm(self.norm, self.groups, dtype=self.dtype, name="norm2")(h))
    h = conv(self.out_ch, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, kernel=1, dtype=self.dtype, name="nin_shortcut")(x)
    return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions (1x1 q/k/v/proj convs)."""
  norm: str = "group"
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = Norm(self.norm, self.groups, dtype=self.dtype, name="norm")(x)
    q, k, v = (conv(c, kernel=1, dtype=self.dtype, name=n)(h).reshape(b, hgt * wid, c)
               for n in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (c ** -0.5), axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hgt, wid, c)
    return x.astype(self.dtype) + conv(c, kernel=1, dtype=self.dtype, name="proj_out")(out)


def upsample_nearest(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


# Nearest 2x upsampling followed by a 3x3 conv, as four 2x2 convs at the low resolution (one
# per output phase): output row 2i + a sees low-res rows {i-1, i} (a=0) or {i, i+1} (a=1),
# with the 3x3 kernel's rows summed accordingly. Same result, 16/36 of the multiplications.
_PHASE_ROWS = (np.array([[1, 0, 0], [0, 1, 1]], np.float32),
               np.array([[1, 1, 0], [0, 0, 1]], np.float32))


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling + 3x3 conv (taming's Upsample with_conv=True).

  Parameters are those of the 3x3 conv (kernel [3, 3, in, out], bias), so checkpoints match
  `conv(...)(upsample_nearest(x))`, which this computes without building the 4x input.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", partitioned(CONV_INIT, None, None, "conv_in", "conv_out"),
                        (3, 3, c, self.features), jnp.float32)
    bias = self.param("bias", partitioned(nn.initializers.zeros, "conv_out"), (self.features,),
                      jnp.float32)
    bf16 = self.dtype == jnp.bfloat16
    x = x.astype(self.dtype)
    rows = []
    for a in (0, 1):
      cols = []
      for b in (0, 1):
        k = jnp.einsum("ry,sx,yxio->rsio", _PHASE_ROWS[a], _PHASE_ROWS[b], kernel)
        pad = ((1 - a, a), (1 - b, b))
        cols.append(jax.lax.conv_general_dilated(
            x, k.astype(self.dtype), (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32 if bf16 else None))
      rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2(b), O]
    out = jnp.stack(rows, axis=2)  # [B, H, 2(a), W, 2(b), O]
    bsz, h, _, w, _, o = out.shape
    out = out.reshape(bsz, 2 * h, 2 * w, o) + bias
    return out.astype(jnp.float32 if bf16 else self.dtype)


class Encoder(nn.Module):
  """Images [B, H, W, C] -> latents [B, H/f, W/f, z_channels] (compute dtype)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  z_channels: int = 256
  norm: str = "group"
  norm_groups: int = 32
  mid_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = {"norm": self.norm, "groups": self.norm_groups, "dtype": self.dtype}
    h = conv(self.ch, dtype=self.dtype, name="conv_in")(constrain(x, ACT))
    res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, name=f"down_{i}_block_{j}", **kw)(h)
        if res in self.attn_resolutions:
          h = AttnBlock(name=f"down_{i}_attn_{j}", **kw)(h)
      if i != len(self.ch_mult) - 1:
        # taming pads right and bottom by one, then a VALID stride-2 conv.
        h = conv(h.shape[-1], stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                 name=f"down_{i}_downsample")(h)
        res //= 2
      h = constrain(h, ACT)
    h = ResnetBlock(h.shape[-1], name="mid_block_1", **kw)(h)
    if self.mid_attention:
      h = AttnBlock(name="mid_attn_1", **kw)(h)
    h = ResnetBlock(h.shape[-1], name="mid_block_2", **kw)(h)
    h = nn.swish(Norm(self.norm, self.norm_groups, dtype=self.dtype, name="norm_out")(h))
    return constrain(conv(self.z_channels, dtype=self.dtype, name="conv_out")(h), ACT)


class Decoder(nn.Module):
  """Latents [B, h, w, z_channels] -> images [B, h*f, w*f, out_channels] (float32)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  out_channels: int = 3
  norm: str = "group"
  norm_groups: int = 32
  mid_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    kw = {"norm": self.norm, "groups": self.norm_groups, "dtype": self.dtype}
    levels = len(self.ch_mult)
    res = self.resolution // 2 ** (levels - 1)
    h = conv(self.ch * self.ch_mult[-1], dtype=self.dtype, name="conv_in")(constrain(z, ACT))
    h = ResnetBlock(h.shape[-1], name="mid_block_1", **kw)(h)
    if self.mid_attention:
      h = AttnBlock(name="mid_attn_1", **kw)(h)
    h = ResnetBlock(h.shape[-1], name="mid_block_2", **kw)(h)
    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[i], name=f"up_{i}_block_{j}", **kw)(h)
        if res in self.attn_resolutions:
          h = AttnBlock(name=f"up_{i}_attn_{j}", **kw)(h)
      if i != 0:
        h = Upsample(h.shape[-1], dtype=self.dtype, name=f"up_{i}_upsample")(h)
        res *= 2
      h = constrain(h, ACT)
    h = nn.swish(Norm(self.norm, self.norm_groups, dtype=self.dtype, name="norm_out")(h))
    # The last layer: its kernel is what the GAN's adaptive weight differentiates against.
    h = conv(self.out_channels, dtype=self.dtype, out_axis=None, name="conv_out")(h)
    return constrain(h.astype(jnp.float32), ACT)


def fold_frames(x: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """[B, T, ...] -> ([B*T, ...], unfold) where unfold maps [B*T, ...'] back to [B, T, ...']."""
  b, t = x.shape[:2]
  return x.reshape((b * t,) + x.shape[2:]), lambda y: y.reshape((b, t) + y.shape[1:])


class VQGAN(nn.Module):
  """Encoder + quantizer + decoder. Built as `VQGAN(**config.model)`.

  Attributes:
    ch, ch_mult, num_res_blocks, attn_resolutions, resolution: as taming's ddconfig;
      attention goes wherever the feature map of a `resolution`-pixel image has a side
      listed in attn_resolutions (whatever the actual input size).
    z_channels: encoder output / decoder input width. embed_dim: code dimension.
    num_codes: codebook size. beta: commitment weight. l2_codes, ema, ema_decay, ema_eps,
      restart_threshold: see `nuwa_jax.models.quantizer`.
    norm: 'group' (taming) | 'pixel' (per-pixel LayerNorm over channels) | 'none'.
    norm_groups: groups of the 'group' norm (taming: 32; capped at the width). With as many
      groups as channels GroupNorm becomes InstanceNorm, which removes each channel's mean
      over the image: narrow models (ch <= 32) then lose the absolute colour of flat regions
      (greyish reconstructions), so narrow configs use fewer groups or 'pixel'.
    mid_attention: attention in the middle blocks.
    dtype: compute dtype 'float32' | 'bfloat16'; parameters and the quantizer are float32.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  z_channels: int = 256
  embed_dim: int = 256
  num_codes: int = 1024
  in_channels: int = 3
  beta: float = 0.25
  l2_codes: bool = False
  ema: bool = False
  ema_decay: float = 0.99
  ema_eps: float = 1e-5
  restart_threshold: float = 0.0
  norm: str = "group"
  norm_groups: int = 32
  mid_attention: bool = True
  dtype: str = "float32"

  @property
  def factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def setup(self):
    if self.norm not in NORMS:
      raise ValueError(f"VQGAN: norm={self.norm!r}, expected one of {NORMS}.")
    dtype = compute_dtype(self.dtype)
    shared = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                  norm=self.norm, norm_groups=self.norm_groups,
                  mid_attention=self.mid_attention, dtype=dtype)
    self.encoder = Encoder(z_channels=self.z_channels, **shared)
    self.decoder = Decoder(out_channels=self.in_channels, **shared)
    self.quant_conv = conv(self.embed_dim, kernel=1, dtype=dtype)
    self.post_quant_conv = conv(self.z_channels, kernel=1, dtype=dtype)
    self.quantizer = VectorQuantizer(
        self.num_codes, self.embed_dim, beta=self.beta, l2_codes=self.l2_codes, ema=self.ema,
        ema_decay=self.ema_decay, ema_eps=self.ema_eps,
        restart_threshold=self.restart_threshold)

  def _check_images(self, images):
    f = self.factor
    if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"VQGAN: expected images [B, H, W, C] with H, W multiples of {f}, "
                       f"got {images.shape}.")

  def encode(self, images: jax.Array, train: bool = False):
    """Images [B, H, W, C] in [-1, 1] -> (z_q [B, h, w, D] float32, indices [B, h, w] int32,
    quant_loss scalar, stats dict). z_q carries the straight-through gradient."""
    self._check_images(images)
    z = self.quant_conv(self.encoder(images))
    return self.quantizer(z, train=train)

  def decode(self, z_q: jax.Array) -> jax.Array:
    """Code vectors [B, h, w, D] -> images [B, h*f, w*f, C] float32 (unclipped)."""
    return self.decoder(self.post_quant_conv(z_q.astype(compute_dtype(self.dtype))))

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Token grid [B, h, w] int -> images [B, h*f, w*f, C] float32."""
    return self.decode(self.quantizer.lookup(indices))

  def __call__(self, images: jax.Array, train: bool = False):
    """Reconstruction. Returns (recon [B, H, W, C] float32, aux) with aux = dict(indices,
    quant_loss, stats)."""
    z_q, indices, quant_loss, stats = self.encode(images, train=train)
    return self.decode(z_q), dict(indices=indices, quant_loss=quant_loss, stats=stats)

  def encode_video(self, videos: jax.Array, train: bool = False):
    """Frame by frame: videos [B, T, H, W, C] -> (z_q [B, T, h, w, D], indices [B, T, h, w],
    quant_loss, stats)."""
    flat, unfold = fold_frames(videos)
    z_q, indices, loss, stats = self.encode(flat, train=train)
    return unfold(z_q), unfold(indices), loss, stats

  def decode_video_indices(self, indices: jax.Array) -> jax.Array:
    """Token grids [B, T, h, w] -> videos [B, T, H, W, C]."""
    flat, unfold = fold_frames(indices)
    return unfold(self.decode_indices(flat))


def last_layer_path() -> tuple[str, ...]:
  """Path in `params` of the kernel the GAN's adaptive weight is computed against."""
  return ("decoder", "conv_out", "kernel")


__all__ = [
  "LOGICAL_RULES",
  "STATS",
  "VQGAN",
  "Decoder",
  "Encoder",
  "Norm",
  "fold_frames",
  "last_layer_path",
]
