"""NUWA-Infinity text-to-image: caption scores on held-out synthetic captions (the scene
scorer), CLIP-SIM, FID/KID/IS of the samples and held-out bits per token.

  python -m nuwa_jax.eval --config=configs/eval/nuwa_text.py:dataset=scenes --workdir=demo/nuwa

Variants: height=, width= (pixels; 0: one patch), dataset=, num_samples=N (caption scores;
FID and CLIP-SIM use N too), guidance=S,
top_k=K.
"""

import ml_collections

from configs.eval.common import weights
from nuwa_jax.config_utils import parse_variant


def get_config(arg=None):
  v = parse_variant(arg, dataset="", height=0, width=0, num_samples=200, guidance=3.0,
                    top_k=64, seed=0)
  c = ml_collections.ConfigDict()
  c.weights = weights()
  sampling = dict(dataset=v.dataset, seed=v.seed, height=v.height, width=v.width,
                  guidance=v.guidance, top_k=v.top_k)
  c.evals = ml_collections.ConfigDict({
      "nll": dict(type="nll", orders=("right",), num_chains=6, empty_pool=True),
      "captions": dict(type="captions", task="text_to_image", num_samples=v.num_samples,
                       **sampling),
      "clip_sim": dict(type="clip_sim", num_samples=v.num_samples, **sampling),
      "fid": dict(type="fid", task="text_to_image", num_samples=v.num_samples, **sampling),
  })
  return c
