"""The main job: embedded data → tiny tokenizer → tiny NUWA-Infinity → the five tasks.

  python -m nuwa_jax.demo --workdir=demo            # ~20 min on a 2-core CPU
  python -m nuwa_jax.demo --workdir=demo            # again: reuses everything, only samples

Stages (each skipped when its output exists, so a rerun or a resumed run only redoes what is
missing; the training stages resume from their checkpoints):
  1. data        sample_media (photos, clips shipped by pip packages) and synthetic captioned
                 scenes and clips, built as tfds datasets in WORKDIR/data;
  2. tokenizer   configs/vqgan.py:size=tiny trained on photos + scenes → WORKDIR/vqgan;
  3. tokens      every dataset pre-tokenised with it → WORKDIR/tokens/<name>;
  4. model       configs/nuwa_infinity.py:size=tiny trained on all token datasets (photos,
                 captioned scenes, captioned clips) → WORKDIR/nuwa;
  5. samples     a wide panorama, an outpainting of a held-out photo, an animation of a photo,
                 text-to-image and text-to-video from held-out synthetic captions with their
                 scores → WORKDIR/samples/seed<S>/<task>/ and .../contact_sheet.png
                 (a rerun with another --seed only samples; with the same seed it only
                 rewrites what is missing).

The step counts below are what fits the 20-minute budget on this machine (BUILD_NOTES.md,
"Main job"); --scale multiplies them for a longer, better run.
"""

from __future__ import annotations

import json
import os
import time


from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "demo", "Where everything goes.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Multiplies the training steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")

# Each trainer stops at its step count or its time budget, whichever comes first.
VQGAN_STEPS, VQGAN_MINUTES = 3000, 7.0
NUWA_STEPS, NUWA_MINUTES = 12000, 7.0
CLIPS = dict(num_train=400, num_test=20, height=64, width=64, frames=8)
SHORT_SIDE = {"photos": 128, "scenes": 64, "clips": 64}  # pixels before tokenising
# Patch grids (frames, rows, cols) the model trains on; each batch uses one that fits.
GRIDS = ((1, 1, 1), (1, 2, 2), (1, 2, 3), (1, 3, 3), (1, 2, 4), (2, 2, 2), (4, 2, 2))
TOP_K = 64
GUIDANCE = 3.0


def _stage(name: str):
  logging.info("=== %s ===", name)
  return time.time()


def build_data(data_dir: str) -> dict:
  from nuwa_jax.data import datasets  # pylint: disable=g-import-not-at-top
  builders = {
      "photos": datasets.get_builder("sample_media", data_dir, config="images"),
      "scenes": datasets.get_builder("synthetic_scenes", data_dir),  # 2000 + 200, 64 x 64
      "clips": datasets.get_builder("synthetic_clips", data_dir, **CLIPS),
  }
  datasets.ensure_built(list(builders.values()))
  return builders


def _latest(workdir: str) -> int:
  from nuwa_jax.runtime.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return 0
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 1, 1, async_save=False)
  try:
    return ckpt.latest_step() or 0
  finally:
    ckpt.close()


def _train(config, workdir: str) -> None:
  """Trains (resuming) unless the workdir already holds the final checkpoint."""
  from nuwa_jax.config_utils import write_config  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  # FINISHED.json: the run ended (step or time budget), not killed.
  if checkpoint.finished_step(workdir) is not None and _latest(workdir):
    logging.info("%s: trained already (step %d), reused", workdir, _latest(workdir))
    return
  trainer = importlib.import_module(f"nuwa_jax.trainers.{config.trainer}")
  trainer.validate(config)
  write_config(config, workdir)
  checkpoint.clear_finished(workdir)
  result = trainer.train(config, workdir)
  if not result.get("preempted"):
    checkpoint.mark_finished(workdir, int(result["last_step"]))


def caption_model(path: str, builders) -> str:
  """One sentencepiece model for the captions of all captioned datasets (they are mixed)."""
  from nuwa_jax.data import captions as captions_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    texts = [t for b in builders for t in captions_lib.dataset_captions(b)]
    captions_lib.train_tokenizer(texts, path, vocab_size=256)
  return path


def pretokenize_all(workdir: str, data_dir: str, tokenizer_dir: str, builders: dict,
                    spm: str, text_len: int) -> list[str]:
  from nuwa_jax.config_utils import load_json  # pylint: disable=g-import-not-at-top
  from nuwa_jax.data import pretokenize  # pylint: disable=g-import-not-at-top
  from nuwa_jax.trainers import vqgan as vqgan_trainer  # pylint: disable=g-import-not-at-top
  encoder = None
  folders = []
  for name, builder in builders.items():
    out = os.path.join(workdir, "tokens", name)
    folders.append(out)
    if os.path.isdir(out) and pretokenize.read_meta(out) and _built_tokens(out, data_dir):
      continue
    if encoder is None:
      vq_config = load_json(os.path.join(tokenizer_dir, "config.json"))
      encoder = pretokenize.Encoder(*vqgan_trainer.load(vq_config, tokenizer_dir))
    pretokenize.pretokenize(tokenizer_dir, builder, out, SHORT_SIDE[name], chunk_size=64,
                            text_len=text_len if name != "photos" else 0, data_dir=data_dir,
                            caption_model=spm if name != "photos" else None, encoder=encoder)
  return folders


def _built_tokens(folder: str, data_dir: str) -> bool:
  from nuwa_jax.data import datasets  # pylint: disable=g-import-not-at-top
  try:
    return datasets.get_builder("token_grids", data_dir, folder=folder).is_prepared()
  except Exception:  # pylint: disable=broad-except
    return False


def samples(workdir: str, nuwa_dir: str, builders: dict, seed: int) -> dict:
  """The five tasks; returns {task: result summary}."""
  from nuwa_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  from nuwa_jax.data import captions as captions_lib  # pylint: disable=g-import-not-at-top
  from nuwa_jax.data import media  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime import images  # pylint: disable=g-import-not-at-top
  photo = media.sample_media_paths()[0]["coffee"]  # in the test split of sample_media:images
  scene_caption = captions_lib.dataset_captions(builders["scenes"], "test")[0]
  clip_caption = captions_lib.dataset_captions(builders["clips"], "test")[0]
  out = os.path.join(workdir, "samples", f"seed{seed}")
  common = dict(checkpoint=nuwa_dir, seed=seed, top_k=TOP_K)
  requests = [
      sample_lib.Request(task="unconditional", out=f"{out}/panorama", height=64, width=2048,
                         **common),
      sample_lib.Request(task="outpaint", out=f"{out}/outpaint", image=photo,
                         direction="right", height=64, width=256, **common),
      sample_lib.Request(task="animate", out=f"{out}/animate", image=photo, height=64,
                         width=64, frames=8, **common),
      sample_lib.Request(task="text_to_image", out=f"{out}/text_to_image", text=scene_caption,
                         height=64, width=64, guidance=GUIDANCE, batch=4, **common),
      sample_lib.Request(task="text_to_video", out=f"{out}/text_to_video", text=clip_caption,
                         height=64, width=64, frames=8, guidance=GUIDANCE, batch=2, **common),
  ]
  loaded = sample_lib.load(requests[3])
  summary, sheet = {}, []
  for request in requests:
    t0 = time.time()
    result = sample_lib.run(request, loaded)
    summary[request.task] = {
        "out": request.out, "text": request.text, "patches": result["patches"],
        "seconds": round(result["seconds"], 2), "compile_seconds":
        round(result["compile_seconds"], 2), "scores": result["scores"],
        "wall_seconds": round(time.time() - t0, 1)}
    logging.info("%s: %s", request.task, summary[request.task])
    sheet += sample_lib.sheet_items(request, result, loaded.factor)
  summary["contact_sheet"] = images.contact_sheet(os.path.join(out, "contact_sheet.png"),
                                                  sheet, width=1024, max_upscale=3)
  return summary


def main(argv):
  del argv
  from configs import nuwa_infinity as nuwa_config  # pylint: disable=g-import-not-at-top
  from configs import vqgan as vqgan_config  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime.logs import quiet_library_logs  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime import host_memory  # pylint: disable=g-import-not-at-top
  quiet_library_logs()
  host_memory.keep_freed_memory()  # before JAX starts (runtime/host_memory.py)
  workdir = os.path.abspath(_WORKDIR.value)
  data_dir = os.path.join(workdir, "data")
  times, t_all = {}, time.time()

  t = _stage("1/5 data")
  builders = build_data(data_dir)
  spm = caption_model(os.path.join(workdir, "captions.model"),
                      [builders["scenes"], builders["clips"]])
  times["data"] = time.time() - t

  t = _stage("2/5 tokenizer")
  vq_dir = os.path.join(workdir, "vqgan")
  variant = f"size=tiny,steps={max(1, int(VQGAN_STEPS * _SCALE.value))}"
  if VQGAN_MINUTES:
    variant += f",minutes={VQGAN_MINUTES * _SCALE.value}"
  vq = vqgan_config.get_config(variant)
  vq.data.data_dir = data_dir  # photos + scenes (the config's default datasets)
  _train(vq, vq_dir)
  times["tokenizer"] = time.time() - t

  t = _stage("3/5 tokens")
  nuwa = nuwa_config.get_config(f"size=tiny,data=token_grids,"
                                f"steps={max(1, int(NUWA_STEPS * _SCALE.value))},"
                                f"minutes={NUWA_MINUTES * _SCALE.value}")
  folders = pretokenize_all(workdir, data_dir, vq_dir, builders, spm, nuwa.model.text_len)
  times["tokens"] = time.time() - t

  t = _stage("4/5 model")
  nuwa_dir = os.path.join(workdir, "nuwa")
  nuwa.data.update(dataset=",".join(folders), data_dir=data_dir, tokenizer_workdir=vq_dir,
                   caption_model=spm)
  nuwa.grids = GRIDS
  nuwa.evals.nll.every_steps = 500
  _train(nuwa, nuwa_dir)
  times["model"] = time.time() - t

  t = _stage("5/5 samples")
  summary = samples(workdir, nuwa_dir, builders, _SEED.value)
  times["samples"] = time.time() - t
  times["total"] = time.time() - t_all
  summary["stage_seconds"] = {k: round(v, 1) for k, v in times.items()}
  path = os.path.join(workdir, "samples", f"seed{_SEED.value}", "summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1, default=str)
  os.replace(path + ".tmp", path)
  logging.info("done in %.1f min: %s; pictures in %s", times["total"] / 60,
               summary["stage_seconds"], os.path.join(workdir, "samples"))
  print(f"main job done in {times['total'] / 60:.1f} min; see {summary['contact_sheet']}")


if __name__ == "__main__":
  app.run(main)
