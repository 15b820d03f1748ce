"""Converts pytorch-fid's Inception weights to the project's .npz (nuwa_jax.models.inception).

  python -m nuwa_jax.tools.convert_inception \
      --input=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

The input is pytorch-fid's FIDInceptionV3 state dict (`Conv2d_1a_3x3.conv.weight`, ...,
`fc.weight`; read without running pickled code) or an .npz of the same keys. Every key must be
used once with the network's shape (`num_batches_tracked` is ignored), else nothing is
written. Conv kernels go OIHW -> HWIO, fc's weight is transposed; prints the sha256.
"""

from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

import numpy as np
from flax import traverse_util

from nuwa_jax.models import inception, weights
from nuwa_jax.tools import convert_common

# Flax batch-norm leaf -> torch BatchNorm2d entry.
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
CONFIG = {"num_classes": 1008}


def convert(state: Mapping[str, np.ndarray], where: str = "state dict") -> dict[str, np.ndarray]:
  """Maps a pytorch-fid state dict to the flat ('/'-joined) params of `InceptionV3`.

  The list of names and shapes comes from the Flax module itself, so the two cannot drift.

  Args:
    state: torch key -> array (as from `convert_common.read_state_dict`).
    where: how to name the source in errors (the file's path).
  Returns:
    Flat name -> float32 array, e.g. `Mixed_5b/branch1x1/conv/kernel` [1, 1, 192, 64].
  Raises:
    convert_common.ConversionError naming a missing, misshapen or unused key.
  """
  source = convert_common.Source(
      state, where, ignore=[k for k in state if k.endswith(".num_batches_tracked")])
  abstract = traverse_util.flatten_dict(
      inception.abstract_params(inception.InceptionV3(**CONFIG)), sep="/")
  out = {}
  for name, leaf in abstract.items():
    *path, kind = name.split("/")
    module, shape = ".".join(path), tuple(leaf.shape)
    if kind == "kernel" and len(shape) == 4:
      kh, kw, cin, cout = shape
      out[name] = source.take(f"{module}.weight", (cout, cin, kh, kw)).transpose(2, 3, 1, 0)
    elif kind == "kernel":
      out[name] = source.take(f"{module}.weight", shape[::-1]).T
    elif path[-1] == "bn":
      out[name] = source.take(f"{module}.{_BN[kind]}", shape)
    else:
      out[name] = source.take(f"{module}.{kind}", shape)
  source.finish()
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> int:
  """The command; returns the exit status (2 with a one-line `error:` on bad input).

  Args:
    argv: command-line arguments without the program name (default: sys.argv[1:]).
  Returns:
    0 on success, 2 on a bad or unwritable file.
  """
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True,
                 help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or an .npz)")
  p.add_argument("--out", required=True, help="output .npz (a .sha256 file is written beside)")
  a = p.parse_args(argv)
  try:
    flat = convert(convert_common.read_state_dict(a.input), where=a.input)
    digest = weights.save(flat, a.out, inception.FORMAT, CONFIG)
  except (convert_common.ConversionError, weights.WeightsError) as e:
    # Messages already start with the file; torch's may span lines.
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {a.out}: cannot write ({' '.join(str(e).split())})", file=sys.stderr)
    return 2
  count = sum(v.size for v in flat.values())
  print(f"wrote {a.out}: {len(flat)} arrays, {count} values, sha256 {digest}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
