"""Converts OpenAI's CLIP weights (ViT models) to the project's .npz (nuwa_jax.models.clip).

  python -m nuwa_jax.tools.convert_clip --input=ViT-B-32.pt --out=clip_vit_b32.npz

--input is OpenAI's TorchScript archive (read with torch.jit.load, no pickled code run), a
state dict saved with torch.save, or an .npz of the same key names. The sizes are inferred
from the shapes as CLIP's build_model does; every key must be used (the archive's
input_resolution / context_length / vocab_size entries excepted), so a foreign or damaged file
fails naming the key. ResNet CLIPs are refused. Prints the output's sha256; bad input exits
with status 2 and one line `error: <file>: ...`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Mapping, Sequence

import numpy as np

from nuwa_jax.models import clip
from nuwa_jax.models import weights
from nuwa_jax.tools import convert_common
from nuwa_jax.tools.convert_common import ConversionError

# Hyper-parameters stored as tensors in OpenAI's TorchScript files; build_model drops them too.
IGNORED = ("input_resolution", "context_length", "vocab_size")
VISUAL_BLOCKS = "visual.transformer.resblocks."
TEXT_BLOCKS = "transformer.resblocks."


def _shape(state: Mapping[str, np.ndarray], key: str, ndim: int, where: str) -> tuple[int, ...]:
  if key not in state:
    raise ConversionError(f"{where}: missing key {key!r}")
  shape = tuple(np.shape(state[key]))
  if len(shape) != ndim:
    raise ConversionError(f"{where}: {key} has shape {shape}, expected {ndim} dimensions")
  return shape


def _layers(state: Mapping[str, np.ndarray], prefix: str) -> int:
  # One past the highest index, so a gap shows up as a missing key of the absent block.
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = [int(m.group(1)) for m in map(pattern.match, state) if m]
  return max(found) + 1 if found else 0


def infer_config(state: Mapping[str, np.ndarray], where: str = "state dict") -> clip.CLIPConfig:
  """Model sizes from the shapes of OpenAI's state dict (ViT CLIPs only).

  Args:
    state: key -> array in OpenAI's layout.
    where: the file, for messages.

  Returns:
    The config.

  Raises:
    ConversionError: a ResNet CLIP, or keys / shapes that are not a ViT CLIP's.
  """
  if "visual.proj" not in state:
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state):
      raise ConversionError(f"{where}: a ResNet CLIP (visual.layer1-4, visual.attnpool); only "
                            "the ViT CLIPs (ViT-B/32, ViT-B/16, ViT-L/14) are supported")
    raise ConversionError(f"{where}: missing key 'visual.proj'; not a ViT CLIP state dict")
  vision_width, _, _, patch = _shape(state, "visual.conv1.weight", 4, where)
  tokens, _ = _shape(state, "visual.positional_embedding", 2, where)
  grid = round(math.sqrt(max(tokens - 1, 0)))
  if grid * grid + 1 != tokens:
    raise ConversionError(f"{where}: visual.positional_embedding has {tokens} rows, expected a "
                          "square grid of patches plus the class token")
  width = _shape(state, "ln_final.weight", 1, where)[0]
  try:
    return clip.CLIPConfig(
        embed_dim=_shape(state, "text_projection", 2, where)[1],
        image_resolution=patch * grid,
        vision_layers=_layers(state, VISUAL_BLOCKS),
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=_shape(state, "positional_embedding", 2, where)[0],
        vocab_size=_shape(state, "token_embedding.weight", 2, where)[0],
        transformer_width=width,
        transformer_heads=max(1, width // clip.HEAD_WIDTH),
        transformer_layers=_layers(state, TEXT_BLOCKS))
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from None


def convert(state: Mapping[str, np.ndarray],
            where: str = "state dict") -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """OpenAI's CLIP state dict -> the flat parameters of `clip.CLIP` and its config.

  Args:
    state: key -> array (torch layouts: Linear [out, in], Conv2d [out, in, kh, kw]).
    where: the file, for messages.

  Returns:
    ('/'-named float32 arrays, the config as a dict), ready for `weights.save`.

  Raises:
    ConversionError: unused keys, missing keys or wrong shapes, naming them; ResNet CLIPs.
  """
  config = infer_config(state, where)
  source = convert_common.Source(state, where, ignore=IGNORED)
  flat: dict[str, np.ndarray] = {}

  def take(key, shape):
    return np.asarray(source.take(key, shape), np.float32)

  def put(name, value):
    # np.array, not np.ascontiguousarray, which turns the 0-d logit scale into shape (1,).
    flat[name] = np.array(value, np.float32, order="C")

  def layer_norm(name, key, width):
    put(f"{name}/scale", take(f"{key}.weight", (width,)))
    put(f"{name}/bias", take(f"{key}.bias", (width,)))

  def linear(name, key, fan_in, fan_out):
    put(f"{name}/kernel", take(f"{key}.weight", (fan_out, fan_in)).T)
    put(f"{name}/bias", take(f"{key}.bias", (fan_out,)))

  def blocks(name, prefix, layers, width):
    for i in range(layers):
      n, k = f"{name}/resblocks_{i}", f"{prefix}{i}"
      layer_norm(f"{n}/ln_1", f"{k}.ln_1", width)
      put(f"{n}/in_proj/kernel", take(f"{k}.attn.in_proj_weight", (3 * width, width)).T)
      put(f"{n}/in_proj/bias", take(f"{k}.attn.in_proj_bias", (3 * width,)))
      linear(f"{n}/out_proj", f"{k}.attn.out_proj", width, width)
      layer_norm(f"{n}/ln_2", f"{k}.ln_2", width)
      linear(f"{n}/c_fc", f"{k}.mlp.c_fc", width, 4 * width)
      linear(f"{n}/c_proj", f"{k}.mlp.c_proj", 4 * width, width)

  c = config
  vw, tw, p = c.vision_width, c.transformer_width, c.vision_patch_size
  put("visual/conv1/kernel", take("visual.conv1.weight", (vw, 3, p, p)).transpose(2, 3, 1, 0))
  put("visual/class_embedding", take("visual.class_embedding", (vw,)))
  put("visual/positional_embedding",
      take("visual.positional_embedding", (c.grid * c.grid + 1, vw)))
  layer_norm("visual/ln_pre", "visual.ln_pre", vw)
  blocks("visual", VISUAL_BLOCKS, c.vision_layers, vw)
  layer_norm("visual/ln_post", "visual.ln_post", vw)
  put("visual/proj", take("visual.proj", (vw, c.embed_dim)))
  put("text/token_embedding/embedding", take("token_embedding.weight", (c.vocab_size, tw)))
  put("text/positional_embedding", take("positional_embedding", (c.context_length, tw)))
  blocks("text", TEXT_BLOCKS, c.transformer_layers, tw)
  layer_norm("text/ln_final", "ln_final", tw)
  put("text/text_projection", take("text_projection", (tw, c.embed_dim)))
  put("logit_scale", take("logit_scale", ()))
  source.finish()
  # The module's own tree is the last word: a converter bug fails here, not when loading.
  try:
    weights.check_against(flat, clip.abstract_params(config), where)
  except weights.WeightsError as e:
    raise ConversionError(str(e)) from None
  return flat, config.to_dict()


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="OpenAI CLIP .pt (TorchScript or state dict)")
  p.add_argument("--out", required=True, help="output .npz")
  a = p.parse_args(argv)
  try:
    state = convert_common.read_state_dict(a.input)
    flat, config = convert(state, where=a.input)
  except ConversionError as e:
    print(f"error: {e}".replace("\n", " "), file=sys.stderr)
    return 2
  try:
    digest = weights.save(flat, a.out, clip.FORMAT, config)
  except OSError as e:
    print(f"error: {a.out}: cannot write ({e})".replace("\n", " "), file=sys.stderr)
    return 2
  c = clip.CLIPConfig.from_dict(config)
  print(f"wrote {a.out}: {len(flat)} arrays; vision {c.vision_layers} layers x "
        f"{c.vision_width}, patch {c.vision_patch_size} at {c.image_resolution}px; text "
        f"{c.transformer_layers} layers x {c.transformer_width}, context {c.context_length}, "
        f"vocab {c.vocab_size}; embed {c.embed_dim}")
  print(f"sha256 {digest}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
