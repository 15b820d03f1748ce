"""Computes and caches the reference feature statistics of a dataset split.

  python -m nuwa_jax.tools.reference_stats --tokens=demo/tokens/scenes --data_dir=demo/data \
      --weights=inception_fid.npz --size=64,64 --num=200 --cache_dir=demo/data/reference_stats
  python -m nuwa_jax.tools.reference_stats --dataset_dir=TFDS/synthetic_clips/<config>/1.0.0 \
      --network=i3d --feature=i3d --weights=i3d_k400.npz --size=64,64 --frames=8 --num=64

The cache file is `<cache_dir>/<key>.npz`, the key a hash of the dataset, split, weights
sha256, feature, resize protocol, size, block and N: the same key the evaluators compute, so
an evaluation finds these statistics instead of recomputing them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from nuwa_jax.data import references as data_refs
from nuwa_jax.evaluators import networks
from nuwa_jax.evaluators.common import Skipped
from nuwa_jax.evaluators.references import References
from nuwa_jax.models.weights import WeightsError


def _ints(text: str, count: int, flag: str) -> tuple[int, ...]:
  try:
    values = tuple(int(x) for x in text.split(","))
  except ValueError:
    values = ()
  if len(values) != count or min(values) < 1:
    raise ValueError(f"{flag}={text!r}: expected {count} positive integers, comma-separated")
  return values


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--dataset_dir", help="a built tfds dataset folder (.../<name>/<config>/1.0.0)")
  src.add_argument("--tokens", help="a pre-tokenised chunk folder: its source dataset")
  p.add_argument("--data_dir", default="", help="where --tokens' source dataset lives")
  p.add_argument("--split", default="test")
  p.add_argument("--network", default="inception", choices=("inception", "i3d"))
  p.add_argument("--feature", default="pool3", choices=("pool3", "logits", "frames_pool3", "i3d"))
  p.add_argument("--weights", required=True, help="converted weights (.npz)")
  p.add_argument("--size", required=True, help="height,width in pixels")
  p.add_argument("--frames", type=int, default=0, help="clip length (videos)")
  p.add_argument("--block", default="", help="bh,bw: statistics of whole blocks (Block-FID)")
  p.add_argument("--num", type=int, default=64, help="examples (cycled if the split is smaller)")
  p.add_argument("--cache_dir", default="", help="default: <data_dir>/reference_stats")
  a = p.parse_args(argv)
  try:
    size = _ints(a.size, 2, "--size")
    block = _ints(a.block, 2, "--block") if a.block else None
    if a.num < 2:
      raise ValueError(f"--num={a.num}: expected at least 2")
    folder = a.dataset_dir or data_refs.source_dir(a.tokens, a.data_dir)
    net = networks.load(a.network, a.weights)
    if isinstance(net, Skipped):
      raise ValueError(net.reason)
    cache = a.cache_dir or os.path.join(a.data_dir or os.path.dirname(folder), "reference_stats")
    refs = References({"data": folder}, cache, a.split)
    shape = (a.frames,) + size if a.frames else size
    stats, _, key = refs.features("data", net, a.feature, a.num, shape, block)
  except (ValueError, WeightsError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{os.path.join(cache, key + '.npz')}: {stats.count} feature rows of width {stats.dim} "
        f"({refs.held_out('data').name}, split {a.split}, weights {net.sha256[:12]})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
