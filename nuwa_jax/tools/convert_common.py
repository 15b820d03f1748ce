"""Reading the PyTorch files people already have, and strict name-by-name conversion.

`read_state_dict` takes a state-dict file (`torch.load(weights_only=True)`: no pickled code is
run), a TorchScript archive (OpenAI's CLIP `.pt` files are these; read with `torch.jit.load`,
which runs no Python pickle), or an .npz of the same key names (no torch needed). `Source`
hands out tensors by name and remembers which were taken, so a converter ends with
`source.finish()`, which fails on any key it did not use.
"""

from __future__ import annotations

import zipfile
from typing import Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
  """A source file that does not match the network a converter expects."""


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel  # optional: only converters need it
  except ImportError:
    raise ConversionError("reading PyTorch files needs torch (pip install 'nuwa_jax[convert]'), "
                          "or give an .npz of the same key names") from None
  return torch


def _is_torchscript(path: str) -> bool:
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
  except zipfile.BadZipFile:
    return False


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Name -> float32/int numpy array from a .pth/.pt/.bin, TorchScript archive or .npz file."""
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError) as e:
      raise ConversionError(f"{path}: not a readable .npz ({e})") from None
  torch = _torch()
  try:
    if _is_torchscript(path):
      state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
      state = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise ConversionError(f"{path}: no such file") from None
  except Exception as e:  # torch raises many kinds for damaged or foreign files
    raise ConversionError(f"{path}: not a PyTorch weights file torch can read safely ({e})"
                          ) from None
  if isinstance(state, Mapping) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ConversionError(f"{path}: expected a state dict, got {type(state).__name__}")
  out = {}
  for k, v in state.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu()
      out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return out


class Source:
  """Tensors by name; `take` marks a key used, `finish` fails on keys never taken."""

  def __init__(self, arrays: Mapping[str, np.ndarray], where: str,
               ignore: Iterable[str] = ()):
    self.arrays, self.where = dict(arrays), where
    self.used = set(k for k in ignore if k in self.arrays)

  def has(self, key: str) -> bool:
    return key in self.arrays

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in self.arrays:
      raise ConversionError(f"{self.where}: missing key {key!r}")
    value = self.arrays[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(f"{self.where}: {key} has shape {tuple(value.shape)}, "
                            f"expected {tuple(shape)}")
    self.used.add(key)
    return value

  def finish(self):
    unused = sorted(set(self.arrays) - self.used)
    if unused:
      raise ConversionError(f"{self.where}: {len(unused)} unused keys {unused[:8]}"
                            f"{' ...' if len(unused) > 8 else ''}")
