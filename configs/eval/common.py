"""Parts shared by the eval configs: the weight files of the metric networks."""

import ml_collections


def weights() -> ml_collections.ConfigDict:
  """Converted metric networks (nuwa_jax.tools.convert_*); an empty path skips the metrics
  that need it (an error with --strict). Set with --config.weights.inception=PATH etc."""
  return ml_collections.ConfigDict(dict(inception="", clip="", i3d=""))
