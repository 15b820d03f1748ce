"""The FID Inception-v3 (pytorch-fid's FIDInceptionV3, TF graph 2015-12-05) in Flax, NHWC.

Module and parameter names follow the PyTorch state dict (`Mixed_5b/branch5x5_1/conv/kernel`
is `Mixed_5b.branch5x5_1.conv.weight`), so `nuwa_jax.tools.convert_inception` derives its
mapping from this tree. Batch norm is inference-only: the running statistics are params
(`bn/mean`, `bn/var`) beside `bn/scale`, `bn/bias`. `preprocess` reproduces pytorch-fid's input
path (uint8 -> [0, 1] -> bilinear 299x299, align_corners=False, no antialias -> [-1, 1]);
`FIDInception` is the host-side feature extractor the evaluators call on uint8 images.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nuwa_jax.models import weights

FORMAT = "nuwa_jax.inception_fid.v1"
FID_SIZE = 299
BN_EPS = 1e-3
# The metric is defined in float32; TPUs would otherwise multiply in bfloat16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BatchNormInference(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias with fixed statistics."""
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    mul = scale * jax.lax.rsqrt(var + self.eps)
    return x * mul + (bias - mean * mul)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv without bias, batch norm (eps 1e-3), ReLU."""
  features: int
  kernel: int | tuple[int, int] = 1
  stride: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                padding=[(p, p) for p in _pair(self.padding)], use_bias=False,
                precision=_PRECISION, name="conv")(x)
    return nn.relu(BatchNormInference(name="bn")(x))


def _chain(x, *convs: BasicConv2d):
  for conv in convs:
    x = conv(x)
  return x


def _avg_pool_3x3(x):
  # TF's average pool (pytorch-fid's patch): padded zeros are not counted in the mean.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
  """Mixed_5b..5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    C = BasicConv2d  # pylint: disable=invalid-name
    return jnp.concatenate([
        C(64, name="branch1x1")(x),
        _chain(x, C(48, name="branch5x5_1"), C(64, 5, padding=2, name="branch5x5_2")),
        _chain(x, C(64, name="branch3x3dbl_1"), C(96, 3, padding=1, name="branch3x3dbl_2"),
               C(96, 3, padding=1, name="branch3x3dbl_3")),
        C(self.pool_features, name="branch_pool")(_avg_pool_3x3(x)),
    ], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | max pool 3/2."""

  @nn.compact
  def __call__(self, x):
    C = BasicConv2d  # pylint: disable=invalid-name
    return jnp.concatenate([
        C(384, 3, stride=2, name="branch3x3")(x),
        _chain(x, C(64, name="branch3x3dbl_1"), C(96, 3, padding=1, name="branch3x3dbl_2"),
               C(96, 3, stride=2, name="branch3x3dbl_3")),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 convolutions as (1, 7) and (7, 1) pairs."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    C, c7 = BasicConv2d, self.channels_7x7  # pylint: disable=invalid-name
    row = dict(kernel=(1, 7), padding=(0, 3))
    col = dict(kernel=(7, 1), padding=(3, 0))
    return jnp.concatenate([
        C(192, name="branch1x1")(x),
        _chain(x, C(c7, name="branch7x7_1"), C(c7, **row, name="branch7x7_2"),
               C(192, **col, name="branch7x7_3")),
        _chain(x, C(c7, name="branch7x7dbl_1"), C(c7, **col, name="branch7x7dbl_2"),
               C(c7, **row, name="branch7x7dbl_3"), C(c7, **col, name="branch7x7dbl_4"),
               C(192, **row, name="branch7x7dbl_5")),
        C(192, name="branch_pool")(_avg_pool_3x3(x)),
    ], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3/2."""

  @nn.compact
  def __call__(self, x):
    C = BasicConv2d  # pylint: disable=invalid-name
    return jnp.concatenate([
        _chain(x, C(192, name="branch3x3_1"), C(320, 3, stride=2, name="branch3x3_2")),
        _chain(x, C(192, name="branch7x7x3_1"),
               C(192, (1, 7), padding=(0, 3), name="branch7x7x3_2"),
               C(192, (7, 1), padding=(3, 0), name="branch7x7x3_3"),
               C(192, 3, stride=2, name="branch7x7x3_4")),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c: 3x3 branches split into (1, 3) and (3, 1) halves.

  `pool="max"` is Mixed_7c of the FID graph (FIDInceptionE_2), whose pool branch is a 3x3
  max pool where the paper and torchvision have an average pool.
  """
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    C = BasicConv2d  # pylint: disable=invalid-name

    def split(y, prefix):
      return [C(384, (1, 3), padding=(0, 1), name=prefix + "a")(y),
              C(384, (3, 1), padding=(1, 0), name=prefix + "b")(y)]

    b3 = C(384, name="branch3x3_1")(x)
    bd = _chain(x, C(448, name="branch3x3dbl_1"), C(384, 3, padding=1, name="branch3x3dbl_2"))
    pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.pool == "max"
              else _avg_pool_3x3(x))
    return jnp.concatenate(
        [C(320, name="branch1x1")(x), *split(b3, "branch3x3_2"), *split(bd, "branch3x3dbl_3"),
         C(192, name="branch_pool")(pooled)], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's FIDInceptionV3 on NHWC images in [-1, 1] (at least 75x75).

  Returns {"pool3": [B, 2048] global average of Mixed_7c, "logits": [B, num_classes]}.
  """
  num_classes: int = 1008

  @nn.compact
  def __call__(self, x):
    C = BasicConv2d  # pylint: disable=invalid-name
    x = _chain(x, C(32, 3, stride=2, name="Conv2d_1a_3x3"), C(32, 3, name="Conv2d_2a_3x3"),
               C(64, 3, padding=1, name="Conv2d_2b_3x3"))
    x = _max_pool_3x3_s2(x)
    x = _chain(x, C(80, 1, name="Conv2d_3b_1x1"), C(192, 3, name="Conv2d_4a_3x3"))
    x = _max_pool_3x3_s2(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, precision=_PRECISION, name="fc")(pool3)
    return {"pool3": pool3, "logits": logits}


@functools.lru_cache(maxsize=8)
def abstract_params(module: InceptionV3) -> dict[str, Any]:
  """Shapes and dtypes of `module`'s params (no arrays are allocated; cached: tracing the
  network takes seconds). Callers must not modify the returned tree.

  Args:
    module: the network.
  Returns:
    The nested params tree of jax.ShapeDtypeStruct.
  """
  return jax.eval_shape(lambda: module.init(jax.random.key(0),
                                            jnp.zeros((1, 75, 75, 3))))["params"]


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-d linear interpolation, align_corners=False."""
  # torch's float32 index arithmetic: scale * (i + 0.5) - 0.5 as one fused multiply-add (the
  # float64 product of two float32 values is exact, then one rounding), so the weights are
  # bit-identical to its kernel's.
  scale = np.float32(n_in) / np.float32(n_out)
  src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(src.astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0.astype(np.float32)
  m = np.zeros((n_out, n_in), np.float32)
  rows = np.arange(n_out)
  np.add.at(m, (rows, i0), np.float32(1) - frac)
  np.add.at(m, (rows, i1), frac)
  return m


def resize_bilinear(images, size: int | tuple[int, int]):
  """Bilinear resize equal to torch's F.interpolate(mode='bilinear', align_corners=False).

  No antialiasing (also when shrinking), as pytorch-fid. One matrix product per axis.

  Args:
    images: float [N, H, W, C] (numpy or jax).
    size: output (height, width), or one int for both.
  Returns:
    float32 jax array [N, height, width, C].
  """
  height, width = _pair(size)
  rows = jnp.asarray(_bilinear_matrix(images.shape[1], height))
  cols = jnp.asarray(_bilinear_matrix(images.shape[2], width))
  x = jnp.einsum("qw,nhwc->nhqc", cols, jnp.asarray(images, jnp.float32), precision=_PRECISION)
  return jnp.einsum("ph,nhqc->npqc", rows, x, precision=_PRECISION)


def preprocess(images_uint8, size: int = FID_SIZE, resize: bool = True):
  """pytorch-fid's input path: uint8 -> [0, 1] -> bilinear size x size -> [-1, 1].

  Args:
    images_uint8: uint8 [N, H, W, 3].
    size: the network's input size (299 for FID).
    resize: False feeds the images at their own size (the network pools adaptively).
  Returns:
    float32 jax array [N, size, size, 3] (or [N, H, W, 3]) in [-1, 1].
  """
  x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
  if resize:
    x = resize_bilinear(x, size)
  return 2.0 * x - 1.0


class FIDInception:
  """Inception features of uint8 images on the host: `net(images)["pool3" | "logits"]`.

  Batches have a fixed size (the last one is zero-padded), so one compiled program serves
  every N and an image's features do not depend on its batch.
  """

  def __init__(self, params: Mapping[str, Any], config: Mapping[str, Any] | None = None,
               sha256: str = "", path: str = "", batch_size: int = 50):
    self.config = dict(config or {})
    self.module = InceptionV3(**self.config)
    self.params = jax.device_put(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params))
    self.sha256, self.path, self.batch_size = sha256, path, int(batch_size)
    # Two programs: the resize (one per input size, small) and the network (one for the fixed
    # 299 x 299 input), so pictures and blocks of many sizes share one compiled network.
    self._prepare = jax.jit(preprocess, static_argnames=("size", "resize"))
    self._network = jax.jit(lambda params, x: self.module.apply({"params": params}, x))

  def _forward(self, params, images_uint8, resize: bool):
    return self._network(params, self._prepare(images_uint8, resize=resize))

  @classmethod
  def load(cls, path: str, batch_size: int = 50) -> FIDInception:
    """The network of a file written by `nuwa_jax.tools.convert_inception`.

    Args:
      path: the .npz weights file.
      batch_size: images per compiled forward.
    Returns:
      The extractor; raises weights.WeightsError for a missing, foreign or misshapen file.
    """
    flat, config, digest = weights.read(path, FORMAT)
    try:
      module = InceptionV3(**config)
    except TypeError as e:
      raise weights.WeightsError(f"{path}: config {config} is not InceptionV3's ({e})") from None
    weights.check_against(flat, abstract_params(module), path)
    return cls(weights.unflatten(flat), config, digest, path, batch_size)

  @classmethod
  def random(cls, seed: int = 0, batch_size: int = 8, num_classes: int = 1008) -> FIDInception:
    """Random weights for tests: He-initialised convs and random, unit-scale BN statistics.

    Args:
      seed: the random seed.
      batch_size: images per compiled forward.
      num_classes: width of the logits.
    Returns:
      The extractor (sha256 "random-<seed>", path "").
    """
    rng = np.random.default_rng(seed)
    # Statistics near what a unit-scale input gives, so no layer saturates or dies.
    draws = {"scale": lambda n: rng.uniform(0.7, 1.3, n), "bias": lambda n: rng.normal(0, 0.2, n),
             "mean": lambda n: rng.normal(0, 0.2, n), "var": lambda n: rng.uniform(0.5, 2.0, n)}
    abstract = traverse_util.flatten_dict(abstract_params(InceptionV3(num_classes)), sep="/")
    flat = {}
    for name, leaf in abstract.items():
      kind = name.rsplit("/", 1)[1]
      if kind == "kernel":
        # He normal over the fan-in for the ReLU convs (LeCun for fc): unit-scale activations.
        fan_in = int(np.prod(leaf.shape[:-1]))
        gain = 2.0 if name.endswith("/conv/kernel") else 1.0
        flat[name] = rng.normal(0.0, np.sqrt(gain / fan_in), leaf.shape).astype(np.float32)
      else:
        flat[name] = draws[kind](leaf.shape).astype(np.float32)
    return cls(weights.unflatten(flat), {"num_classes": num_classes}, f"random-{seed}", "",
               batch_size)

  def __call__(self, images_uint8: np.ndarray, resize: bool = True) -> dict[str, np.ndarray]:
    """Features of images.

    Args:
      images_uint8: uint8 [N, H, W, 3].
      resize: True (the FID protocol) resizes to 299x299; False feeds the images as they are
        (at least 75x75).
    Returns:
      {"pool3": float32 [N, 2048], "logits": float32 [N, num_classes]}.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} "
                       f"{list(images.shape)}")
    n, b = len(images), self.batch_size
    outs: dict[str, list[np.ndarray]] = {"pool3": [], "logits": []}
    for start in range(0, n, b):
      chunk = images[start:start + b]
      if len(chunk) < b:
        chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], np.uint8)])
      got = jax.device_get(self._forward(self.params, chunk, resize=resize))
      for k in outs:
        outs[k].append(np.asarray(got[k][:min(b, n - start)], np.float32))
    widths = {"pool3": 2048, "logits": self.module.num_classes}
    return {k: np.concatenate(v) if v else np.zeros((0, widths[k]), np.float32)
            for k, v in outs.items()}
