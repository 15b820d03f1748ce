"""CLIP (Radford et al. 2021) vision and text transformers in Flax, for the CLIP-SIM metric.

CLIP-SIM is the raw cosine of the L2-normalised image and text features. `CLIPScorer` loads a
file written by `python -m nuwa_jax.tools.convert_clip` (OpenAI's ViT-B/32 by default; every
size is read from the file's config), preprocesses images exactly as CLIP does (bicubic resize
of the short side, centre crop, CLIP's mean / std) and tokenizes with CLIP's BPE
(`nuwa_jax.data.clip_tokenizer`). Images are NHWC here; parameters are named after OpenAI's
(`visual/resblocks_3/in_proj/kernel` is `visual.transformer.resblocks.3.attn.in_proj_weight`
transposed). Features are computed in float32 at the highest matmul precision.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from nuwa_jax.data import clip_tokenizer
from nuwa_jax.models import weights

FORMAT = "nuwa_jax.clip.v1"
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# A metric must not change with the accelerator's default (on TPU, single-pass bf16) matmuls.
PRECISION = jax.lax.Precision.HIGHEST
# PyTorch's LayerNorm epsilon, which CLIP was trained with (flax's default is 1e-6).
LN_EPS = 1e-5
HEAD_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Sizes of a ViT CLIP, named as the arguments of OpenAI's `CLIP` constructor."""
  embed_dim: int = 512
  image_resolution: int = 224
  vision_layers: int = 12
  vision_width: int = 768
  vision_patch_size: int = 32
  context_length: int = 77
  vocab_size: int = 49408
  transformer_width: int = 512
  transformer_heads: int = 8
  transformer_layers: int = 12

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"CLIP config {f.name}={value!r}: expected a positive integer")
    if self.vision_width % self.vision_heads:
      raise ValueError(f"CLIP config vision_width={self.vision_width}: CLIP's vision heads are "
                       f"width // {HEAD_WIDTH}, which must divide it (a multiple of 64 does)")
    if self.transformer_width % self.transformer_heads:
      raise ValueError(f"CLIP config transformer_width={self.transformer_width} is not a "
                       f"multiple of transformer_heads={self.transformer_heads}")
    if self.image_resolution % self.vision_patch_size:
      raise ValueError(f"CLIP config image_resolution={self.image_resolution} is not a "
                       f"multiple of vision_patch_size={self.vision_patch_size}")

  @property
  def vision_heads(self) -> int:
    # CLIP's rule; at least one head for the narrow towers of tests.
    return max(1, self.vision_width // HEAD_WIDTH)

  @property
  def grid(self) -> int:
    return self.image_resolution // self.vision_patch_size

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
    """The config of a dict with exactly the field names.

    Args:
      d: field name -> value (e.g. a weights file's stored config).

    Returns:
      The config.

    Raises:
      ValueError: unknown or missing names, or invalid sizes.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(d) - names), sorted(names - set(d))
    if unknown or missing:
      raise ValueError(f"CLIP config: unknown keys {unknown}, missing keys {missing}")
    return cls(**dict(d))


VIT_B_32 = CLIPConfig()


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation x * sigmoid(1.702 x) (the weights were trained with it)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, precision=PRECISION, name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, name=name)


class ResidualBlock(nn.Module):
  """Pre-norm block: x + attn(ln_1(x)), then x + c_proj(quick_gelu(c_fc(ln_2(x))))."""
  width: int
  heads: int
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, _ = x.shape
    head = self.width // self.heads
    h = _layer_norm("ln_1")(x)
    # One projection to [q | k | v], each split into heads in order, as torch's in_proj_weight.
    qkv = _dense(3 * self.width, "in_proj")(h).reshape(b, length, 3, self.heads, head)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head ** -0.5), k, precision=PRECISION)
    if self.causal:
      allowed = jnp.tril(jnp.ones((length, length), bool))
      logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v, precision=PRECISION)
    x = x + _dense(self.width, "out_proj")(out.reshape(b, length, self.width))
    h = quick_gelu(_dense(4 * self.width, "c_fc")(_layer_norm("ln_2")(x)))
    return x + _dense(self.width, "c_proj")(h)


class VisionTransformer(nn.Module):
  """Normalised images [B, R, R, 3] -> image features [B, output_dim] (not unit length)."""
  resolution: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    p, scale = self.patch_size, self.width ** -0.5
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                precision=PRECISION, name="conv1")(pixels)
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)  # patches in row-major order, as torch's flatten
    cls = self.param("class_embedding", nn.initializers.normal(scale), (self.width,))
    grid = self.resolution // p
    pos = self.param("positional_embedding", nn.initializers.normal(scale),
                     (grid * grid + 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1) + pos
    x = _layer_norm("ln_pre")(x)
    for i in range(self.layers):
      x = ResidualBlock(self.width, self.heads, name=f"resblocks_{i}")(x)
    x = _layer_norm("ln_post")(x[:, 0])
    proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim))
    return jnp.dot(x, proj, precision=PRECISION)


class TextTransformer(nn.Module):
  """Token ids [B, L] (L <= context_length) -> text features [B, output_dim] (not unit length).

  The feature is the final-norm state at the end-of-text token, found as the largest id of the
  row (CLIP's end id 49407 is its vocabulary's last).
  """
  context_length: int
  vocab_size: int
  width: int
  heads: int
  layers: int
  output_dim: int

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    length = ids.shape[1]
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(ids)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (self.context_length, self.width))
    x = x + pos[:length]
    for i in range(self.layers):
      x = ResidualBlock(self.width, self.heads, causal=True, name=f"resblocks_{i}")(x)
    x = _layer_norm("ln_final")(x)
    end = jnp.argmax(ids, axis=-1)
    x = jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]
    proj = self.param("text_projection", nn.initializers.normal(self.width ** -0.5),
                      (self.width, self.output_dim))
    return jnp.dot(x, proj, precision=PRECISION)


class CLIP(nn.Module):
  """Both towers (`visual`, `text`) and CLIP's logit scale; `__call__` returns both features."""
  config: CLIPConfig = VIT_B_32

  def setup(self):
    c = self.config
    self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width,
                                    c.vision_layers, c.vision_heads, c.embed_dim)
    self.text = TextTransformer(c.context_length, c.vocab_size, c.transformer_width,
                                c.transformer_heads, c.transformer_layers, c.embed_dim)
    # Kept so a converted file is the whole model; CLIP-SIM does not use it.
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)),
                                  ())

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    return self.visual(pixels)

  def encode_text(self, ids: jax.Array) -> jax.Array:
    return self.text(ids)

  def __call__(self, pixels: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_image(pixels), self.encode_text(ids)


def _example_inputs(config: CLIPConfig) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  r = config.image_resolution
  return (jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32),
          jax.ShapeDtypeStruct((1, config.context_length), jnp.int32))


def abstract_params(config: CLIPConfig) -> dict[str, Any]:
  """Shapes of the `params` tree of `CLIP(config)`, computed without allocating it.

  Args:
    config: the sizes.

  Returns:
    The tree of jax.ShapeDtypeStruct.
  """
  return jax.eval_shape(CLIP(config).init, jax.random.PRNGKey(0),
                        *_example_inputs(config))["params"]


def preprocess(image: Any, resolution: int = 224) -> np.ndarray:
  """CLIP's image transform: bicubic resize of the short side, centre crop, RGB, normalise.

  Args:
    image: a PIL image, or a uint8 array [H, W, 3] (also [H, W], [H, W, 1], [H, W, 4]).
    resolution: the model's input size.

  Returns:
    float32 [resolution, resolution, 3], (x / 255 - MEAN) / STD.

  Raises:
    ValueError: an array that is not uint8 or not an image.
  """
  if not isinstance(image, Image.Image):
    a = np.asarray(image)
    if a.dtype != np.uint8:
      raise ValueError(f"images must be uint8 in [0, 255], got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
      raise ValueError(f"an image must be [H, W, 3] (or grey / RGBA), got shape {a.shape}")
    image = Image.fromarray(a)
  w, h = image.size
  # torchvision's Resize(int): the short side becomes `resolution`, the long side is truncated.
  size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h),
                                                                  resolution)
  if size != image.size:
    image = image.resize(size, Image.Resampling.BICUBIC)
  w, h = image.size
  # torchvision's CenterCrop rounds the offsets with Python's round (half to even).
  left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
  image = image.crop((left, top, left + resolution, top + resolution)).convert("RGB")
  x = np.asarray(image, np.float32) / np.float32(255.0)
  return (x - MEAN) / STD


def random_params(config: CLIPConfig, seed: int = 0) -> dict[str, Any]:
  """CLIP-like random weights drawn on the host (for tests and dry runs, not for metrics).

  Numpy draws them: XLA compiles flax's init (one threefry per leaf) far more slowly than the
  towers themselves, which a test of a tiny model would spend most of its time on.

  Args:
    config: the sizes.
    seed: numpy seed.

  Returns:
    A `params` tree of `CLIP(config)`: norms at 1 / 0, biases 0, other leaves normal with
    standard deviation fan_in ** -0.5 (matrices) or width ** -0.5 (embeddings).
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for name, leaf in traverse_util.flatten_dict(abstract_params(config), sep="/").items():
    last, shape = name.rsplit("/", 1)[-1], tuple(leaf.shape)
    if name == "logit_scale":
      value = np.full(shape, math.log(1 / 0.07))
    elif last == "scale":
      value = np.ones(shape)
    elif last == "bias":
      value = np.zeros(shape)
    else:
      fan_in = math.prod(shape[:-1]) if last in ("kernel", "proj", "text_projection") else (
          shape[-1])
      value = rng.normal(0.0, fan_in ** -0.5, shape)
    flat[name] = value.astype(np.float32)
  return weights.unflatten(flat)


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=8)
def _programs(config: CLIPConfig):
  """(module, image program, text program) of a config, shared by every scorer of that size."""
  module = CLIP(config)

  def image(params, pixels):
    return _unit(module.apply({"params": params}, pixels, method=CLIP.encode_image))

  def text(params, ids):
    return _unit(module.apply({"params": params}, ids, method=CLIP.encode_text))

  # Parameters are arguments, not constants folded into the programs.
  return module, jax.jit(image), jax.jit(text)


class CLIPScorer:
  """CLIP-SIM on the host: unit image / text features and their cosines, as numpy arrays.

  Inputs go through one jitted program per tower in batches of exactly `batch_size` (the last
  one zero-padded), so a row's features do not depend on how many rows are given at once.
  """

  def __init__(self, params: Mapping[str, Any], config: CLIPConfig = VIT_B_32, *,
               batch_size: int = 32, path: str | None = None, sha256: str | None = None,
               vocab_path: str | None = None):
    """Wraps a parameter tree (use `load` or `random` to make one).

    Args:
      params: the `params` tree of `CLIP(config)`.
      config: the sizes.
      batch_size: rows per jitted call.
      path: the weights file it came from, if any.
      sha256: that file's digest.
      vocab_path: CLIP's BPE vocabulary; by default the installed `clip` package's.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}: expected >= 1")
    self.config, self.batch_size = config, batch_size
    self.path, self.sha256, self.vocab_path = path, sha256, vocab_path
    self.module, self._image_fn, self._text_fn = _programs(config)
    self.params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dict(params))

  @classmethod
  def load(cls, path: str, *, batch_size: int = 32,
           vocab_path: str | None = None) -> CLIPScorer:
    """Reads a file written by convert_clip (or `save`), checking every leaf's name and shape.

    Args:
      path: the .npz.
      batch_size: rows per jitted call.
      vocab_path: CLIP's BPE vocabulary; by default the installed `clip` package's.

    Returns:
      The scorer.

    Raises:
      weights.WeightsError: a missing file, another format, a bad config or wrong leaves.
    """
    flat, stored, digest = weights.read(path, FORMAT)
    try:
      config = CLIPConfig.from_dict(stored)
    except (TypeError, ValueError) as e:
      raise weights.WeightsError(f"{path}: {e}") from None
    weights.check_against(flat, abstract_params(config), path)
    return cls(weights.unflatten(flat), config, batch_size=batch_size, path=path,
               sha256=digest, vocab_path=vocab_path)

  @classmethod
  def random(cls, seed: int = 0, config: CLIPConfig = VIT_B_32, **kwargs) -> CLIPScorer:
    """A scorer with `random_params` weights (for tests and dry runs, not for metrics).

    Args:
      seed: numpy seed of the weights.
      config: the sizes (make them tiny for tests).
      **kwargs: as for the constructor (batch_size, vocab_path).

    Returns:
      The scorer.
    """
    return cls(random_params(config, seed), config, **kwargs)

  def save(self, path: str) -> str:
    """Writes the weights and config in the project's format.

    Args:
      path: the .npz to write (a `<path>.sha256` is written beside it).

    Returns:
      The file's sha256.
    """
    return weights.save(self.params, path, FORMAT, self.config.to_dict())

  def _batched(self, fn, rows: Sequence[Any], prepare) -> np.ndarray:
    out = [np.zeros((0, self.config.embed_dim), np.float32)]
    for start in range(0, len(rows), self.batch_size):
      x = prepare(rows[start:start + self.batch_size])
      n = x.shape[0]
      if n < self.batch_size:
        x = np.concatenate([x, np.zeros((self.batch_size - n,) + x.shape[1:], x.dtype)])
      out.append(np.asarray(fn(self.params, x))[:n])
    return np.concatenate(out)

  def image_features(self, images: Any) -> np.ndarray:
    """Unit-length CLIP image features.

    Args:
      images: uint8 [N, H, W, 3], or a sequence of uint8 [H, W, 3] arrays / PIL images of
        any sizes (each is resized and centre-cropped as CLIP does).

    Returns:
      float32 [N, embed_dim].
    """
    if isinstance(images, np.ndarray) and images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    r = self.config.image_resolution
    # Preprocessed a batch at a time: the float pixels of a whole evaluation set would not fit.
    return self._batched(self._image_fn, images,
                         lambda chunk: np.stack([preprocess(im, r) for im in chunk]))

  def token_features(self, ids: Any) -> np.ndarray:
    """Unit-length CLIP text features of token rows (as `clip_tokenizer.tokenize` makes).

    Args:
      ids: int [N, L], L <= context_length; each row's end token must be its largest id.

    Returns:
      float32 [N, embed_dim].
    """
    ids = np.asarray(ids)
    ctx, vocab = self.config.context_length, self.config.vocab_size
    if ids.ndim != 2 or ids.shape[1] > ctx or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"token ids must be int [N, <= {ctx}], got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(f"token ids must be in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
    # Zero columns after the end token change nothing: the causal mask hides them from it.
    ids = np.pad(ids.astype(np.int32), ((0, 0), (0, ctx - ids.shape[1])))
    return self._batched(self._text_fn, ids, lambda chunk: chunk)

  def text_features(self, texts: Sequence[str]) -> np.ndarray:
    """Unit-length CLIP text features (CLIP's BPE; texts longer than the context truncated).

    Args:
      texts: the captions.

    Returns:
      float32 [N, embed_dim].
    """
    if isinstance(texts, str):
      texts = [texts]
    tokenizer = clip_tokenizer.get_tokenizer(self.vocab_path)
    if tokenizer.vocab_size != self.config.vocab_size:
      raise ValueError(f"this CLIP has {self.config.vocab_size} token ids but CLIP's tokenizer "
                       f"makes {tokenizer.vocab_size}; use token_features for other vocabularies")
    return self.token_features(tokenizer.tokenize(list(texts), self.config.context_length))

  def clip_sim(self, images: Any, texts: Sequence[str]) -> np.ndarray:
    """Raw cosine of each image with its text (CLIP-SIM; not scaled by 100, not clamped).

    Args:
      images: as for `image_features`, N of them.
      texts: N captions.

    Returns:
      float32 [N].
    """
    if isinstance(texts, str):
      texts = [texts]
    if len(images) != len(texts):
      raise ValueError(f"{len(images)} images but {len(texts)} texts")
    return np.sum(self.image_features(images) * self.text_features(texts), axis=-1)
