"""NUWA-Infinity: patch-level over token-level autoregression with the Nearby Context Pool.

  python -m nuwa_jax.train --config=configs/nuwa_infinity.py:size=tiny --workdir=/tmp/nuwa
  python -m nuwa_jax.tools.aot --config=configs/nuwa_infinity.py:size=paper --topology=v5p:8x8x4

Variants: size=tiny|paper; steps=N (updates; one per patch in render-and-optimize); minutes=M
(stop, save and evaluate at the first chain end after M minutes);
mode=render_and_optimize|full_chain; data=synthetic_token_grids|token_grids; text=true|false.
`config.total_steps` counts optimizer updates: one per patch (render-and-optimize) or one per
chain (full_chain).

Pre-tokenised data (nuwa_jax.data.pretokenize), one or several datasets mixed in one run:

  python -m nuwa_jax.train --config=configs/nuwa_infinity.py:size=tiny,data=token_grids \
      --config.data.dataset=tok/images,tok/scenes,tok/clips --workdir=/tmp/nuwa_mix

Each batch comes from one dataset (`data.weights`: batches of each per cycle, default one
each) and uses a grid of `grids` that fits its smallest example (clips get the multi-frame
grids, images the others); a grid that fits no dataset is an error. With data=token_grids the
tiny model's vocab is the tiny VQGAN's 512 codes (configs/vqgan.py); a vocab smaller than the
tokenizer's codebook is an error naming config.model.vocab.
"""

import ml_collections

from configs.baseline import DEFAULT_RULES
from nuwa_jax.config_utils import check_choice, parse_variant

#          width depth heads mlp   vocab  patch extent     pool text_len text_vocab batch steps
SIZES = {
    "tiny": (128, 2, 4, 512, 256, 4, (1, 2, 2), 24, 16, 256, 8, 400),
    "paper": (1280, 24, 20, 5120, 16384, 16, (1, 2, 2), 32, 64, 16384, 256, 300_000),
}


def get_config(arg=None):
  v = parse_variant(arg, size="tiny", steps=0, minutes=0.0, mode="render_and_optimize",
                    data="synthetic_token_grids", text=True)
  check_choice("config variant size", v.size, SIZES)
  check_choice("config variant mode", v.mode, ("render_and_optimize", "full_chain"))
  check_choice("config variant data", v.data, ("synthetic_token_grids", "token_grids"))
  (width, depth, heads, mlp, vocab, patch, extent, pool, text_len, text_vocab, batch,
   steps) = SIZES[v.size]
  paper = v.size == "paper"
  if v.data == "token_grids" and not paper:
    vocab = 512  # the tiny VQGAN's codebook (configs/vqgan.py)

  c = ml_collections.ConfigDict()
  c.trainer = "nuwa_infinity"
  c.seed = 0
  c.mode = v.mode
  c.total_steps = v.steps or steps
  c.stop_at_step = 0
  # > 0: stop (checkpoint, eval) at the first chain end after this much wall time.
  c.max_train_seconds = 60.0 * v.minutes
  c.batch_size = batch  # chains (examples) per batch, across all hosts
  c.label_smoothing = 0.1 if paper else 0.0
  c.cond_dropout = 0.1  # drop the caption of this share of examples (classifier-free guidance)
  c.order = "random"  # 'random' (every direction, rings) or a raster direction
  # Patch grids (frames, rows, cols) trained on; one per batch of chains.
  c.grids = (((1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 1, 4), (2, 2, 2)) if not paper else
             ((1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 1, 8), (4, 2, 2)))
  c.log_every_steps = 20 if not paper else 100

  c.model = ml_collections.ConfigDict(dict(
      vocab=vocab, patch_rows=patch, patch_cols=patch, extent=extent, width=width, depth=depth,
      num_heads=heads, mlp_dim=mlp, dropout=0.0, text_vocab=text_vocab,
      text_len=text_len if v.text else 0, text_depth=2 if not paper else 6,
      # Layers unrolled on this CPU: measured 1.1x (f32) to 1.4x (bf16) faster per step than
      # nn.scan at the benchmark size (bench/README.md); scanned for the pod config.
      scan_layers=paper, remat="full" if paper else "none",
      dtype="bfloat16" if paper else "float32", pool_slots=pool,
      # Context entries a patch step attends to (each a pool slot + offset index); 0: the most
      # valid entries any order trained on can produce on `grids` (tiny 8, paper 11, of the
      # 75 offsets of extent (1, 2, 2)); a schedule needing more is an error.
      max_context=0))

  # data=token_grids: `dataset` = chunk folder(s) of nuwa_jax.data.pretokenize, comma-separated
  # to mix; `weights` = comma-separated batches per dataset per cycle ("" = one each).
  c.data = ml_collections.ConfigDict(dict(
      name=v.data, num_train=2048, num_eval=64, mirror=False,
      data_dir="", dataset="", weights="", tokenizer_workdir=""))

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4 if paper else 1e-3, warmup_fraction=0.05, decay="linear", b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.01, grad_clip=1.0))

  c.mesh = ml_collections.ConfigDict(dict(slice=1, data=-1, fsdp=1, tensor=1))
  if paper:
    c.mesh.data, c.mesh.fsdp = 1, -1
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = DEFAULT_RULES + (("offsets", None),)
  # paper: align_bias [20, 257, 256] (1.3M elements, 5 MB) stays replicated.
  c.sharding.max_replicated_size = 2 ** 20 if not paper else 2 ** 21

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200 if not paper else 2000,
                                                keep=3, async_save=True))
  # Evaluators (nuwa_jax/evaluators/; configs/eval/ has the full sets the eval command runs).
  # Held-out bits per token on fixed chains; a mix of datasets is scored one batch of each in
  # turn, so num_chains should be at least the number of datasets.
  c.evals = ml_collections.ConfigDict({"nll": dict(
      type="nll", every_steps=200 if not paper else 5000, orders=("right",),
      num_chains=6 if v.data == "token_grids" else 2, empty_pool=False, per_patch=False)})
  return c
