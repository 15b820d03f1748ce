"""NUWA-Infinity videos: caption scores of text-to-video on held-out synthetic clip captions,
FVD and frame-FID of text-to-video and of image animation, held-out bits per token.

  python -m nuwa_jax.eval --config=configs/eval/nuwa_video.py:dataset=clips --workdir=demo/nuwa

Variants: height=, width= (pixels; 0: one patch), dataset=, num_samples=N, frames=T,
guidance=S, top_k=K.
"""

import ml_collections

from configs.eval.common import weights
from nuwa_jax.config_utils import parse_variant


def get_config(arg=None):
  v = parse_variant(arg, dataset="", height=0, width=0, num_samples=32, frames=8,
                    guidance=3.0, top_k=64, seed=0)
  c = ml_collections.ConfigDict()
  c.weights = weights()
  sampling = dict(dataset=v.dataset, seed=v.seed, height=v.height, width=v.width,
                  top_k=v.top_k, frames=v.frames,
                  num_samples=v.num_samples)
  c.evals = ml_collections.ConfigDict({
      "nll": dict(type="nll", orders=("right",), num_chains=6, empty_pool=True),
      "captions": dict(type="captions", task="text_to_video", guidance=v.guidance, **sampling),
      "fvd": dict(type="fvd", task="text_to_video", guidance=v.guidance, **sampling),
      "fvd_animate": dict(type="fvd", task="animate", **sampling),
  })
  return c
