"""The tokenizer: PSNR, SSIM, rFID and codebook use on its fixed held-out crops.

  python -m nuwa_jax.eval --config=configs/eval/vqgan.py --workdir=demo/vqgan --checkpoint=all
"""

import ml_collections

from configs.eval.common import weights
from nuwa_jax.config_utils import parse_variant


def get_config(arg=None):
  parse_variant(arg)
  c = ml_collections.ConfigDict()
  c.weights = weights()
  c.evals = ml_collections.ConfigDict({"tokenizer": dict(type="tokenizer")})
  return c
