"""DALL·E-style baseline: one decoder-only transformer over [text ; image tokens].

  python -m nuwa_jax.train --config=configs/baseline.py:size=tiny --workdir=/tmp/baseline
  python -m nuwa_jax.tools.aot --config=configs/baseline.py:size=1b --topology=v5p:8x8x4

Variants (after the colon, comma separated):
  size=tiny|small|1b   tiny runs on a laptop CPU in a minute; small is the GPT peer size of
                       bench/ (d512, 8 layers); 1b is 1.31B parameters (1.21B in the layers) for pods.
  steps=N              total train steps (default per size).
  data=synthetic_tokens  the dataset (more arrive with the data issue).
"""

import ml_collections

from nuwa_jax.config_utils import check_choice, parse_variant

SIZES = {
    #        width depth heads   mlp  text_len text_vocab rows cols image_vocab batch steps
    "tiny": (128, 2, 4, 512, 8, 64, 8, 8, 256, 16, 300),
    "small": (512, 8, 8, 2048, 16, 1024, 16, 16, 1024, 8, 1000),
    "1b": (2048, 24, 16, 8192, 64, 16384, 32, 32, 16384, 2048, 100_000),
}

# Logical axis name -> mesh axes. Parameters: vocab/embed/mlp/heads/kv/layers/norm/pos;
# activations: batch/length/act_*. FSDP shards weights' embed axis over `fsdp`, tensor
# parallelism shards heads, MLP and vocabulary over `tensor`.
DEFAULT_RULES = (
    ("batch", ("slice", "data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("pos", None),
)


def get_config(arg=None):
  variant = parse_variant(arg, size="tiny", steps=0, data="synthetic_tokens")
  check_choice("config variant size", variant.size, SIZES)
  check_choice("config variant data", variant.data, ("synthetic_tokens",))
  (width, depth, heads, mlp, text_len, text_vocab, rows, cols, image_vocab, batch,
   steps) = SIZES[variant.size]
  big = variant.size == "1b"

  c = ml_collections.ConfigDict()
  c.trainer = "baseline"
  c.seed = 0
  c.total_steps = variant.steps or steps
  c.stop_at_step = 0  # > 0: save and exit after this step (time-limited jobs, tests)
  c.batch_size = batch  # global, across all hosts
  c.label_smoothing = 0.0
  c.log_every_steps = 10 if not big else 50

  c.model = ml_collections.ConfigDict(dict(
      text_vocab=text_vocab, text_len=text_len, image_vocab=image_vocab, image_rows=rows,
      image_cols=cols, width=width, depth=depth, num_heads=heads, mlp_dim=mlp, dropout=0.0,
      scan_layers=True, remat="full" if big else "none",
      dtype="bfloat16" if big else "float32"))

  c.data = ml_collections.ConfigDict(dict(
      name=variant.data, num_train=100_000 if big else 4096, num_eval=256, noise=0.05))

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4 if big else 1e-3, warmup_fraction=0.05, decay="linear", b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.01, grad_clip=1.0))

  c.mesh = ml_collections.ConfigDict(dict(slice=1, data=-1, fsdp=1, tensor=1))
  if big:
    c.mesh.data, c.mesh.fsdp = 1, -1
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = DEFAULT_RULES
  # Parameters with at least this many elements must not stay replicated when the mesh has
  # fsdp or tensor axes.
  c.sharding.max_replicated_size = 2 ** 20

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100 if not big else 1000, keep=3,
                                                async_save=True))
  c.evals = ml_collections.ConfigDict({"held_out": dict(
      type="token_loss", every_steps=100 if not big else 2000, num_batches=4)})
  return c
