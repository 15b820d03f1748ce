"""Converted weights of the metric networks (Inception, CLIP, I3D): one .npz file and its sha256.

A file holds the flax parameter tree flattened to '/'-joined names plus `meta/format` (a string
naming the network and layout version) and `meta/config` (JSON of the module's constructor
arguments, so the module is rebuilt from the file alone). `save` writes to a temporary name and
renames, then writes `<file>.sha256`; `load` checks the format and every leaf's name and shape
against the module's abstract parameters, so a wrong or truncated file fails by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util


class WeightsError(ValueError):
  """A weights file that is missing, of another network, or of the wrong shapes."""


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(params)), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def save(params: Mapping[str, Any], path: str, fmt: str, config: Mapping[str, Any]) -> str:
  """Writes `params` (nested or flat '/'-named) to `path` (.npz); returns its sha256."""
  flat = flatten(params) if any(isinstance(v, Mapping) for v in params.values()) else {
      k: np.asarray(v) for k, v in params.items()}
  arrays = dict(flat)
  arrays["meta/format"] = np.array(fmt)
  arrays["meta/config"] = np.array(json.dumps(dict(config), sort_keys=True))
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
  os.close(fd)
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  digest = file_sha256(path)
  with open(path + ".sha256.tmp", "w", encoding="utf-8") as f:
    f.write(f"{digest}  {os.path.basename(path)}\n")
  os.replace(path + ".sha256.tmp", path + ".sha256")
  return digest


def read(path: str, fmt: str) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
  """(flat arrays, constructor config, sha256) of a file written by `save` for `fmt`."""
  if not path or not os.path.isfile(path):
    raise WeightsError(f"{path}: no such weights file (convert one with nuwa_jax.tools.convert_*)")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: np.asarray(f[k]) for k in f.files}
  except Exception as e:  # zip / npy errors of a damaged file
    raise WeightsError(f"{path}: not a readable .npz weights file ({e})") from None
  found = str(arrays.pop("meta/format", "none"))
  if found != fmt:
    raise WeightsError(f"{path}: weights of format {found!r}, expected {fmt!r}")
  config = json.loads(str(arrays.pop("meta/config", "{}")))
  return arrays, config, file_sha256(path)


def check_against(flat: Mapping[str, np.ndarray], abstract: Mapping[str, Any], where: str):
  """Raises WeightsError naming missing, unused or misshapen leaves of `flat` vs `abstract`."""
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      dict(abstract), sep="/").items()}
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  shapes = sorted(f"{k}: {tuple(flat[k].shape)} vs expected {want[k]}"
                  for k in set(want) & set(flat) if tuple(flat[k].shape) != want[k])
  problems = []
  if missing:
    problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  if extra:
    problems.append(f"unused {extra[:8]}{' ...' if len(extra) > 8 else ''}")
  if shapes:
    problems.append(f"wrong shapes {shapes[:8]}")
  if problems:
    raise WeightsError(f"{where}: " + "; ".join(problems))


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
