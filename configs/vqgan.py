"""VQGAN tokenizer (Taming-style encoder/decoder, vector quantizer, PatchGAN).

  python -m nuwa_jax.train --config=configs/vqgan.py:size=tiny --workdir=/tmp/vqgan
  python -m nuwa_jax.train --config=configs/vqgan.py:size=paper --workdir=gs://.../vqgan \
      --config.loss.perceptual_weights=/path/lpips_vgg.npz --config.data.datasets=image_folder \
      --config.data.folder=/data/lhq

Variants: size=tiny|paper; steps=N; minutes=M (stop, save and evaluate after M minutes of
wall time, whatever the step); gan=0|1 (tiny only: the PatchGAN term from 40% of the steps
on; off by default in tiny); data=a dataset (name[:config]) instead of the default pair.

tiny (this 2-core CPU): 64 px crops, f=8, 512 codes, ch 16 with ch_mult (1,2,4,8), i.e. 16
channels at 64x64, 32 at 32x32, 64 at 16x16, 128 at 8x8; l2-normalised codes with an EMA
codebook and dead-code restarts; no GAN; float32; photos and synthetic scenes half and half.
Chosen for time to a usable tokenizer (BUILD_NOTES "VQGAN tokenizer"): half the FLOPs of ch 32
(1,2,2,4) for nearly the same quality per step; l2 codes beat plain Euclidean codes; bf16 and
per-pixel norms are no faster on XLA:CPU; the GAN is off because it only pays after
thousands of steps and lowers PSNR.
  configs/vqgan.py:size=tiny,minutes=29           2500 steps (the 30-minute quality run)
  configs/vqgan.py:size=tiny,steps=300,minutes=5   a from-scratch tokenizer in about 5 min
paper: f16, 16384 codes, 256 px, ch 128, ch_mult (1,1,2,2,4), attention at 16.
"""

import ml_collections

from configs.baseline import DEFAULT_RULES
from nuwa_jax.config_utils import check_choice, parse_variant
from nuwa_jax.models.vqgan import LOGICAL_RULES


def get_config(arg=None):
  v = parse_variant(arg, size="tiny", steps=0, minutes=0.0, gan=-1,
                    data="sample_media:images,synthetic_scenes")
  check_choice("config variant size", v.size, ("tiny", "paper"))
  paper = v.size == "paper"

  c = ml_collections.ConfigDict()
  c.trainer = "vqgan"
  c.seed = 0
  check_choice("config variant gan", v.gan, (-1, 0, 1))
  gan_on = paper if v.gan == -1 else bool(v.gan)
  c.total_steps = v.steps or (2500 if not paper else 500_000)
  c.stop_at_step = 0
  # > 0: stop (checkpoint, eval) once this much wall time has passed since the start.
  c.max_train_seconds = 60.0 * v.minutes
  c.batch_size = 8 if not paper else 256
  c.crop_size = 64 if not paper else 256
  c.log_every_steps = 25 if not paper else 100

  if paper:
    c.model = ml_collections.ConfigDict(dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
        resolution=256, z_channels=256, embed_dim=256, num_codes=16384, beta=0.25,
        l2_codes=False, ema=False, restart_threshold=0.0, norm="group", norm_groups=32,
        mid_attention=True,
        dtype="bfloat16"))
  else:
    c.model = ml_collections.ConfigDict(dict(
        ch=16, ch_mult=(1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(),
        resolution=64, z_channels=64, embed_dim=32, num_codes=512, beta=0.25,
        l2_codes=True, ema=True, ema_decay=0.95, restart_threshold=0.03, norm="group",
        norm_groups=32, mid_attention=True, dtype="float32"))
  c.disc = ml_collections.ConfigDict(dict(ndf=64 if paper else 16, n_layers=3,
                                          dtype=c.model.dtype))
  c.loss = ml_collections.ConfigDict(dict(
      rec_weight=1.0, perceptual_weight=1.0, perceptual_weights="", codebook_weight=1.0,
      disc_weight=0.8 if gan_on else 0.0,
      disc_start=250_001 if paper else int(0.4 * c.total_steps), r1_gamma=0.0))

  c.data = ml_collections.ConfigDict(dict(
      datasets=v.data, data_dir="", folder="", crops_per_image=64, max_scale=1.0, flip=True,
      held_out_crops=32,
      # Relative shares of the datasets in the training stream ("": by their sizes). The 10
      # training photos of sample_media would otherwise be 0.5% of the crops.
      weights="1,1" if v.data == "sample_media:images,synthetic_scenes" else ""))

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4 if paper else 1e-3, warmup_steps=0, warmup_fraction=0.02, decay="cosine",
      b1=0.5, b2=0.9, grad_clip=1.0))

  c.mesh = ml_collections.ConfigDict(dict(slice=1, data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = DEFAULT_RULES + LOGICAL_RULES
  c.sharding.max_replicated_size = 2 ** 22

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500 if not paper else 5000,
                                                keep=2, async_save=True))
  # Fixed held-out crops per dataset (data.held_out_crops) scored by the tokenizer evaluator;
  # rFID needs the converted FID Inception weights (evals.tokenizer.inception).
  c.evals = ml_collections.ConfigDict({"tokenizer": dict(
      type="tokenizer", every_steps=250 if not paper else 5000, inception="")})
  return c
