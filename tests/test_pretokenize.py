"""Pre-tokenisation: a VQGAN checkpoint the test writes, chunks per host, resume, the dataset."""

import glob
import os

import jax
import numpy as np

from configs import vqgan as vqgan_config
from nuwa_jax.data import datasets, pretokenize
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.trainers import vqgan as vqgan_trainer

from conftest import save_untrained


def make_tokenizer(workdir):
  """A randomly initialised tiny VQGAN saved like a trained one."""
  config = vqgan_config.get_config("size=tiny")
  config.model.ch, config.model.z_channels = 16, 16
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  save_untrained(vqgan_trainer.make_layout(config, mesh), config, workdir)
  return config


def test_pretokenize_writes_resumable_chunks_and_a_token_dataset(tmp_path):
  tok_dir = str(tmp_path / "vqgan")
  config = make_tokenizer(tok_dir)
  data_dir = str(tmp_path / "data")
  scenes = datasets.get_builder("synthetic_scenes", data_dir, num_train=10, num_test=3,
                                width=128)
  out = str(tmp_path / "chunks")
  builder = pretokenize.pretokenize(tok_dir, scenes, out, short_side=64, chunk_size=4,
                                    data_dir=data_dir)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 10,
                                                                          "test": 3}
  source = datasets.data_source(builder, "train")
  tokens = np.asarray(source[0]["tokens"])
  assert tokens.shape == (1, 8, 16) and tokens.dtype == np.int32  # 64x128 px at f=8
  assert tokens.max() < config.model.num_codes
  assert source[0]["caption"].decode().startswith(("a ", "an "))

  # Resume: a lost chunk is re-encoded alone, identically.
  chunks = sorted(glob.glob(os.path.join(out, "train", "*.npz")))
  assert len(chunks) == 3
  with np.load(chunks[1]) as before:
    want = before["tokens_0"]
  os.remove(chunks[1])
  model, params, stats = vqgan_trainer.load(config, tok_dir)
  written = pretokenize.write_chunks(pretokenize.Encoder(model, params, stats),
                                     datasets.data_source(scenes, "train"), "train", out, 64, 4,
                                     None, 0)
  assert written == 1
  with np.load(chunks[1]) as after:
    np.testing.assert_array_equal(after["tokens_0"], want)

  # Two hosts split the examples between them, every example exactly once.
  split_dir = str(tmp_path / "split")
  encoder = pretokenize.Encoder(model, params, stats)
  for p in range(2):
    pretokenize.write_chunks(encoder, datasets.data_source(scenes, "train"), "train",
                             split_dir, 64, 4, None, 0, process=p, processes=2)
  names = []
  for path in glob.glob(os.path.join(split_dir, "train", "*.npz")):
    with np.load(path) as chunk:
      names += list(chunk["names"])
  assert sorted(names) == sorted(f"train/{i}" for i in range(10))


def test_fit_to_factor_resizes_and_crops_to_the_grid():
  pixels = np.zeros((427, 640, 3), np.uint8)
  out = pretokenize.fit_to_factor(pixels, 128, 8)
  assert out.shape[0] == 128 and out.shape[1] % 8 == 0 and 184 <= out.shape[1] <= 192
