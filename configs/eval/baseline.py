"""The DALL·E-style baseline: held-out token loss, accuracy and bits per token.

  python -m nuwa_jax.eval --config=configs/eval/baseline.py --workdir=RUN
"""

import ml_collections

from nuwa_jax.config_utils import parse_variant


def get_config(arg=None):
  v = parse_variant(arg, num_batches=16)
  c = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict({"held_out": dict(type="token_loss",
                                                         num_batches=v.num_batches)})
  return c
