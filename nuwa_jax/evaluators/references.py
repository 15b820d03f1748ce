"""Reference feature statistics of held-out real data, computed once and cached on disk.

The key of a cached file names everything that changes the numbers: the dataset and split,
the network's weights sha256, the feature, the resize protocol, the size (and block size for
Block-FID, frames for FVD) and N. Two evaluations with the same key compare against the same
statistics; `key` is written beside every value so rows can be told comparable or not.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping

import numpy as np
from absl import logging

from nuwa_jax.data.references import HeldOut
from nuwa_jax.evaluators import blocks
from nuwa_jax.evaluators.statistics import FeatureStats

BATCH = 32  # real examples read and featurised at once
RESIZE = "pil-bicubic-cover-centre-crop"  # how held-out pictures are cut to the sample size


def describe(dataset: HeldOut, net: Any, feature: str, count: int, size: tuple[int, ...],
             block: tuple[int, int] | None = None, resize: str = "") -> dict:
  return {"dataset": dataset.name, "split": dataset.split, "weights_sha256": net.sha256,
          "feature": feature, "num": int(count), "size": list(size),
          "block": list(block) if block else None, "resize": resize}


def key_of(desc: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def compute(dataset: HeldOut, featurize: Callable[[np.ndarray], np.ndarray], count: int,
            size: tuple[int, ...], block: tuple[int, int] | None = None) -> FeatureStats:
  """Statistics of `featurize` over `count` held-out examples at `size` ((h, w) pictures or
  (frames, h, w) clips), or over their whole `block` tiles."""
  stats = FeatureStats(keep_features=True)  # KID needs the rows
  for lo in range(0, count, BATCH):
    n = min(BATCH, count - lo)
    if len(size) == 3:
      real = dataset.clips(n, *size, start=lo)
    else:
      real = dataset.images(n, *size, start=lo)
    if block:
      real = np.concatenate([blocks.tile_blocks(x, block, None, "all") for x in real])
    stats.update(np.asarray(featurize(real), np.float64))
  return stats


def cached(cache_dir: str, desc: Mapping[str, Any], make: Callable[[], FeatureStats]
           ) -> tuple[FeatureStats, str]:
  """(statistics, key): read from `cache_dir/<key>.npz` or made and written there."""
  key = key_of(desc)
  path = os.path.join(cache_dir, f"{key}.npz")
  if os.path.isfile(path):
    with np.load(path, allow_pickle=False) as f:
      return FeatureStats.from_arrays({k: f[k] for k in f.files if k != "desc"}), key
  logging.info("reference statistics %s: computing %s", key, dict(desc))
  stats = make()
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, desc=np.array(json.dumps(dict(desc), sort_keys=True)), **stats.to_arrays())
  os.replace(tmp, path)
  return stats, key


def featurizer(net: Any, feature: str) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 pictures (or clips) -> feature rows, for feature 'pool3' | 'logits' (Inception),
  'frames_pool3' (Inception on every frame of clips) or 'i3d' (I3D logits over time)."""
  if feature in ("pool3", "logits"):
    return lambda x: np.asarray(net(x)[feature])
  if feature == "frames_pool3":
    return lambda x: np.asarray(net(x.reshape((-1,) + x.shape[2:]))["pool3"])
  if feature == "i3d":
    return lambda x: np.asarray(net(x)["logits"])
  raise ValueError(f"feature={feature!r}: expected pool3, logits, frames_pool3 or i3d")


class References:
  """The `references` predictor: held-out datasets by name, statistics cached in cache_dir."""

  def __init__(self, folders: Mapping[str, str], cache_dir: str, split: str = "test"):
    self.folders, self.cache_dir, self.split = dict(folders), cache_dir, split
    self._held_out: dict[str, HeldOut] = {}
    self.used_keys: set[str] = set()  # cache keys read since the caller last cleared it

  def held_out(self, name: str) -> HeldOut:
    if not name and len(self.folders) == 1:
      name = next(iter(self.folders))
    if name not in self.folders:
      raise ValueError(f"dataset={name!r}: expected one of {sorted(self.folders)}")
    if name not in self._held_out:
      self._held_out[name] = HeldOut(self.folders[name], self.split)
    return self._held_out[name]

  def features(self, name: str, net: Any, feature: str, count: int, size: tuple[int, ...],
               block: tuple[int, int] | None = None) -> tuple[FeatureStats, np.ndarray, str]:
    """(statistics, raw feature rows, cache key) of `count` held-out examples of `name`."""
    dataset = self.held_out(name)
    desc = describe(dataset, net, feature, count, size, block, resize=RESIZE)
    fn = featurizer(net, feature)

    def make():
      return compute(dataset, fn, count, size, block)
    stats, key = cached(self.cache_dir, desc, make)
    self.used_keys.add(key)
    return stats, stats.features, key
