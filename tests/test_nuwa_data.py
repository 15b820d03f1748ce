"""NUWA-Infinity on pre-tokenised data: images, captioned images and clips mixed in one run
through the train command, at several grid sizes, from a tokenizer saved like the VQGAN
trainer saves it; what each kind feeds the model; clear errors for mismatched configs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, override, save_state, subprocess_env
from PIL import Image

from configs import nuwa_infinity as nuwa_config
from configs import vqgan as vqgan_config
from nuwa_jax.config_utils import ConfigError
from nuwa_jax.data import captions, datasets, pretokenize
from nuwa_jax.data import synthetic_scenes as scenes_lib
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.trainers import nuwa_infinity as trainer
from nuwa_jax.trainers import vqgan as vqgan_trainer

# Patch grids (frames, rows, cols) for 4x4-token patches: 1x1x4 fits only the 8x16-token
# images, 2x2x2 only the 4-frame clips; 1x1x1 and 1x2x2 fit every kind (8x8 tokens at least).
GRIDS = ((1, 1, 1), (1, 2, 2), (1, 1, 4), (2, 2, 2))
KINDS = ("images", "scenes", "clips")


def save_random_tokenizer(workdir):
  """A tiny VQGAN with random weights, written as the VQGAN trainer writes a checkpoint (random
  values instead of its initialisation, which takes ~40 s to compile here)."""
  config = vqgan_config.get_config("size=tiny")
  config.model.ch, config.model.z_channels = 16, 16
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  abstract = vqgan_trainer.make_layout(config, mesh).sharded.abstract
  rng = np.random.default_rng(0)

  def fill(leaf):
    if np.issubdtype(leaf.dtype, np.floating):
      value = rng.normal(size=leaf.shape) * 0.3 + (1.0 if leaf.ndim == 1 else 0.0)
    else:
      value = np.zeros(leaf.shape)
    return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

  state = jax.tree.map(fill, abstract)
  save_state(state, config, workdir)
  return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Three pre-tokenised datasets: uncaptioned images (image_folder, 8x16 tokens), captioned
  scenes (synthetic_scenes, 8x8 tokens, caption ids) and uncaptioned clips (synthetic_clips,
  4 frames of 8x8 tokens)."""
  tmp = tmp_path_factory.mktemp("nuwa_data")
  tok_dir, data_dir = str(tmp / "vqgan"), str(tmp / "tfds")
  save_random_tokenizer(tok_dir)
  folder = tmp / "photos"
  folder.mkdir()
  for i in range(8):  # img0 and img7 fall in the test split (test_fraction 0.3)
    pixels, _ = scenes_lib.random_scene(np.random.default_rng(i), 64, 128)
    Image.fromarray(pixels).save(folder / f"img{i}.png")
  images = datasets.get_builder("image_folder", data_dir, folder=str(folder), test_fraction=0.3)
  scenes = datasets.get_builder("synthetic_scenes", data_dir, num_train=6, num_test=2)
  clips = datasets.get_builder("synthetic_clips", data_dir, num_train=6, num_test=2, frames=4)
  datasets.ensure_built([images, scenes, clips])
  captions.train_tokenizer(captions.dataset_captions(scenes), captions.model_path_for(scenes),
                           vocab_size=64)
  folders = {}
  encoder = pretokenize.Encoder(*vqgan_trainer.load(vqgan_config_of(tok_dir), tok_dir))
  for kind, builder, text_len in (("images", images, 24), ("scenes", scenes, 24),
                                  ("clips", clips, 0)):
    folders[kind] = str(tmp / "tokens" / kind)
    pretokenize.pretokenize(tok_dir, builder, folders[kind], short_side=64, chunk_size=4,
                            text_len=text_len, data_dir=data_dir, encoder=encoder)
  return {"folders": folders, "data_dir": data_dir, "tmp": tmp, "scenes": scenes,
          "tokenizer": tok_dir, "encoder": encoder}


def vqgan_config_of(workdir):
  from nuwa_jax.config_utils import load_json  # pylint: disable=g-import-not-at-top
  return load_json(os.path.join(workdir, "config.json"))


def config_for(data, kinds, **overrides):
  config = nuwa_config.get_config("size=tiny,data=token_grids")
  config.data.dataset = ",".join(data["folders"][k] for k in kinds)
  config.data.data_dir = data["data_dir"]
  config.grids = GRIDS
  config.log_every_steps = 1
  config.checkpoint.every_steps = config.evals.nll.every_steps = 1000
  config.evals.nll.num_chains = 3
  return override(config, **overrides)


def test_pretokenised_datasets_record_tokenizer_captions_and_grid_sizes(data):
  opened = pretokenize.open_token_datasets(config_for(data, KINDS))
  assert [d.name for d in opened] == list(KINDS)
  assert [d.min_grid for d in opened] == [(1, 8, 16), (1, 8, 8), (4, 8, 8)]
  assert [d.captioned for d in opened] == [False, True, False]
  assert all(d.meta["num_codes"] == 512 for d in opened)
  assert 0 < opened[1].max_text <= 24 and opened[1].meta["caption_vocab"] > 3


def test_the_train_command_trains_on_the_mix_of_all_kinds(data, tmp_path):
  """Images, captioned scenes and clips in one run, through `python -m nuwa_jax.train`."""
  folders = ",".join(data["folders"][k] for k in KINDS)
  workdir = tmp_path / "mix"
  cmd = [sys.executable, "-m", "nuwa_jax.train",
         "--config=configs/nuwa_infinity.py:size=tiny,data=token_grids,steps=20",
         f"--config.data.dataset={folders}", f"--config.data.data_dir={data['data_dir']}",
         f"--config.grids={GRIDS}", "--config.evals.nll.num_chains=3", "--config.log_every_steps=1",
         f"--workdir={workdir}"]
  result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(devices=1), capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 20 and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < losses[0] - 0.5, losses  # from ln(512) = 6.24
  # The held-out score at the end covers every kind, one batch each.
  scores = [r for r in rows if "nll/bits" in r][-1]
  assert all(np.isfinite(scores[f"nll/bits/right/{k}"]) for k in KINDS), scores


def test_chains_of_each_kind_have_its_grids_and_text_only_where_captioned(data):
  """What the trainer consumes (the same input functions, without the model): batches cycle
  images, scenes, clips; each kind only at grids that fit it; caption ids for scenes only."""
  config = config_for(data, KINDS)
  train_source, eval_source = trainer.make_sources(config)
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  batches = trainer.make_batches(config, train_source, mesh)
  chains = [trainer.next_chain(config, batches, config.order) for _ in range(24)]
  assert [c.kind for c in chains[:6]] == [0, 1, 2, 0, 1, 2]
  grids = {k: {c.grid for c in chains if c.kind == i} for i, k in enumerate(KINDS)}
  assert grids == {"images": {(1, 1, 1), (1, 2, 2), (1, 1, 4)},
                   "scenes": {(1, 1, 1), (1, 2, 2)},
                   "clips": {(1, 1, 1), (1, 2, 2), (2, 2, 2)}}, grids
  for c in chains:
    assert c.tokens.shape == (int(np.prod(c.grid)), config.batch_size, 16)
    assert c.tokens.max() < 512
    assert c.text.shape == (config.batch_size, config.model.text_len)
    assert c.text_mask.any(-1).all() if c.kind == 1 else not c.text_mask.any()
  # Each kind is read in epochs of its own: its first batch starts with all 6 train examples.
  for kind in range(3):
    first = [train_source.index(kind * config.batch_size + row) for row in range(6)]
    assert sorted(first) == [(kind, i) for i in range(6)], first
  # Resuming at batch 5 gives the chains an uninterrupted run reads there.
  again = trainer.make_batches(config, train_source, mesh, start_batch=5)
  np.testing.assert_array_equal(trainer.next_chain(config, again, config.order).tokens,
                                chains[5].tokens)
  # Held-out batches: one per kind in turn, from the test splits.
  it = trainer.make_batches(config, eval_source, mesh, train=False)
  assert [trainer.next_chain(config, it, "right").kind for _ in range(3)] == [0, 1, 2]
  # data.weights: batches of each dataset per cycle.
  weighted, _ = trainer.make_sources(config_for(data, KINDS, **{"data.weights": "2,1,1"}))
  assert [weighted.source_of(b) for b in range(8)] == [0, 1, 2, 0] * 2


def test_mismatched_configs_are_clear_errors_before_compiling(data):
  with pytest.raises(ConfigError, match=r"config\.model\.vocab=256 .*512 codes"):
    trainer.make_sources(config_for(data, KINDS, **{"model.vocab": 256}))
  with pytest.raises(ConfigError, match=r"config\.model\.text_vocab=8 "):
    trainer.make_sources(config_for(data, ["scenes"], **{"model.text_vocab": 8}))
  # A grid larger than every example (scenes are 8x8 tokens: 3x3 patches of 4x4 need 12x12).
  with pytest.raises(ConfigError, match=r"config\.grids: the patch grid \(1, 3, 3\)"):
    trainer.make_sources(config_for(data, ["scenes"], grids=((1, 1, 1), (1, 3, 3))))
  with pytest.raises(ConfigError, match=r"no grid fits scenes"):
    trainer.make_sources(config_for(data, ["images", "scenes"], grids=((1, 1, 4),)))
  with pytest.raises(ConfigError, match=r"config\.data\.dataset is empty"):
    trainer.make_sources(config_for(data, []))
  with pytest.raises(ConfigError, match=r"config\.data\.weights='2,1'"):
    trainer.make_sources(config_for(data, KINDS, **{"data.weights": "2,1"}))
  # No text in the model: captioned data is fine, the captions are simply not used.
  train, _ = trainer.make_sources(config_for(data, ["scenes"], grids=((1, 2, 2),),
                                             **{"model.text_len": 0}))
  assert train[0]["text"].shape == (0,)


def test_captioned_dataset_without_caption_model_is_an_error(data, tmp_path):
  clips = datasets.get_builder("synthetic_clips", data["data_dir"], num_train=6, num_test=2,
                               frames=4)
  with pytest.raises(ValueError, match="has captions but no caption model"):
    pretokenize.pretokenize(data["tokenizer"], clips, str(tmp_path / "c"), short_side=64,
                            text_len=8, data_dir=data["data_dir"], encoder=data["encoder"])
  # Re-using a chunk folder with other settings would mix two tokenisations.
  with pytest.raises(ValueError, match="short_side"):
    pretokenize.pretokenize(data["tokenizer"], clips, data["folders"]["clips"], short_side=32,
                            data_dir=data["data_dir"], encoder=data["encoder"])
