"""NUWA-Infinity on pictures: held-out bits per token in every order, FID/KID/IS at the trained
size, Block-FID of wide panoramas and of right outpaintings.

  python -m nuwa_jax.eval --config=configs/eval/nuwa_images.py:dataset=photos \
      --workdir=demo/nuwa --config.weights.inception=inception_fid.npz

Variants: height=, width= (pixels; 0: one patch); dataset= the held-out dataset (a name of
the run's token datasets, "" if only one);
num_samples=N (FID, Block-FID); width_factor=K (Block-FID canvases K x the patch width).
"""

import ml_collections

from configs.eval.common import weights
from nuwa_jax.config_utils import parse_variant


def get_config(arg=None):
  v = parse_variant(arg, dataset="", height=0, width=0, num_samples=64, width_factor=4, seed=0)
  c = ml_collections.ConfigDict()
  c.weights = weights()
  common = dict(dataset=v.dataset, seed=v.seed, height=v.height)
  c.evals = ml_collections.ConfigDict({
      "nll": dict(type="nll", orders=("right", "left", "down", "up", "around"), num_chains=6,
                  empty_pool=True, per_grid=True, per_patch=True),
      "fid": dict(type="fid", task="unconditional", num_samples=v.num_samples, width=v.width,
                  **common),
      "block_fid": dict(type="block_fid", task="unconditional", width_factor=v.width_factor,
                        num_samples=max(2, v.num_samples // v.width_factor),
                        region="all", **common),
      "block_fid_outpaint": dict(type="block_fid", task="outpaint", direction="right",
                                 width_factor=v.width_factor,
                                 num_samples=max(2, v.num_samples // v.width_factor),
                                 region="generated", **common),
  })
  return c
