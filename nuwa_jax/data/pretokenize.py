"""Pre-tokenisation: run a trained VQGAN over a dataset and write token grids as a tfds dataset.

  python -m nuwa_jax.data.pretokenize --tokenizer_workdir=workdir/vqgan \
      --dataset=sample_media --config_name=images --short_side=128 --out=tok/images
  python -m nuwa_jax.data.captions --dataset=synthetic_scenes --vocab_size=256
  python -m nuwa_jax.data.pretokenize --tokenizer_workdir=workdir/vqgan \
      --dataset=synthetic_scenes --short_side=128 --text_len=32 --out=tok/scenes
  # several hosts: the same command on every host (jax.distributed as for training)

Phase 1 (every host, resumable): host p encodes examples p, p + n, p + 2n, ... of each split in
chunks and writes each chunk as `<chunks>/<split>/<chunk>-p<p>.npz` (temp file + rename); a
chunk already on disk is skipped, so an interrupted run continues where it stopped.
Phase 2 (process 0): the `token_grids` builder gathers the chunks into an array_record tfds
dataset {tokens int32 [frames, rows, cols], caption, text int32 [L], text_mask bool [L], name}
that the NUWA-Infinity trainer reads (`config.data.name = "token_grids"`,
`config.data.dataset` = the chunk folder, or several comma-separated to mix them).

Images are resized so their shorter side is `short_side` pixels and centre-cropped to a
multiple of the VQGAN factor; clips are tokenised frame by frame. With `text_len` > 0 captions
are encoded with `caption_model` or else the source dataset's own caption model
(`captions.model`, see captions.py); a dataset with captions but no caption model is an error.
Datasets mixed in one run must share the tokenizer and (when captioned) the caption model:
train one caption model on all their captions (`captions.train_tokenizer`) and pass it to each.

The chunk folder also holds `tokens.json` (tokenizer, codebook size, caption model, short
side); the dataset's metadata adds the smallest and largest token grids, so the trainer can
check the model's vocabularies and the patch grids against the data before compiling
(`token_sources`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from PIL import Image

from nuwa_jax.config_utils import ConfigError
from nuwa_jax.data import captions as captions_lib
from nuwa_jax.data import datasets
from nuwa_jax.data.transforms import to_unit_range


def fit_to_factor(pixels: np.ndarray, short_side: int, factor: int) -> np.ndarray:
  """Resize so the shorter side is `short_side`, then centre-crop both sides to multiples of
  `factor`. pixels: uint8 [H, W, 3]."""
  image = Image.fromarray(np.asarray(pixels))
  scale = short_side / min(image.size)
  w, h = max(factor, round(image.width * scale)), max(factor, round(image.height * scale))
  image = image.resize((w, h), Image.BICUBIC)
  cw, ch = w - w % factor, h - h % factor
  left, top = (w - cw) // 2, (h - ch) // 2
  return np.asarray(image.crop((left, top, left + cw, top + ch)))


class Encoder:
  """Jitted VQGAN encoding of [N, H, W, 3] uint8 frames to [N, h, w] tokens."""

  def __init__(self, model, params, stats):
    self.model, self.factor, self.params, self.stats = model, model.factor, params, stats
    from nuwa_jax.models.quantizer import STATS  # pylint: disable=g-import-not-at-top
    variables = {"params": params, **({STATS: stats} if stats else {})}
    self._fn = jax.jit(lambda x: model.apply(variables, x, method=model.encode)[1])

  def __call__(self, frames: np.ndarray) -> np.ndarray:
    return np.asarray(self._fn(to_unit_range(frames)), np.int32)


def encode_example(encoder: Encoder, example: dict, short_side: int) -> np.ndarray:
  """Token grid [frames, rows, cols] of an image or clip example."""
  frames = example["clip"] if "clip" in example else [example["image"]]
  frames = np.stack([fit_to_factor(f, short_side, encoder.factor) for f in frames])
  return encoder(frames)


def write_chunks(encoder: Encoder, source, split: str, chunk_dir: str, short_side: int,
                 chunk_size: int, tokenizer: captions_lib.CaptionTokenizer | None,
                 text_len: int, process: int = 0, processes: int = 1) -> int:
  """Phase 1 for one split on this host; returns how many chunks it wrote (not skipped)."""
  os.makedirs(os.path.join(chunk_dir, split), exist_ok=True)
  mine = list(range(process, len(source), processes))
  written = 0
  for c in range(0, len(mine), chunk_size):
    path = os.path.join(chunk_dir, split, f"{c // chunk_size:05d}-p{process}.npz")
    if os.path.exists(path):
      continue
    tokens, names, texts = [], [], []
    for i in mine[c:c + chunk_size]:
      ex = source[i]
      tokens.append(encode_example(encoder, ex, short_side))
      names.append(ex["name"].decode() if isinstance(ex["name"], bytes) else str(ex["name"]))
      caption = ex.get("caption", b"")
      texts.append(caption.decode() if isinstance(caption, bytes) else caption)
    if tokenizer is not None:
      ids, mask = tokenizer.encode(texts, text_len)
    else:
      ids, mask = np.zeros((len(texts), text_len), np.int32), np.zeros((len(texts), text_len),
                                                                        bool)
    payload = {f"tokens_{k}": t for k, t in enumerate(tokens)}
    tmp = path + ".tmp.npz"
    np.savez(tmp, names=np.asarray(names), captions=np.asarray(texts), text=ids,
             text_mask=mask, shapes=np.asarray([t.shape for t in tokens], np.int32), **payload)
    os.replace(tmp, path)
    written += 1
    logging.info("pretokenize: %s %s (%d examples)", split, os.path.basename(path), len(names))
  return written


META_NAME = "tokens.json"
# What must agree for chunks of one folder (a resumed run) and for datasets mixed in one run.
_IDENTITY = ("tokenizer_sha256", "short_side", "text_len", "caption_model_sha256")


def _sha256_of_file(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def _sha256_of_params(params) -> str:
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def write_meta(out_dir: str, meta: dict) -> None:
  """Writes `tokens.json` into the chunk folder (process 0); a folder holding chunks of another
  tokenizer, short side, caption length or caption model is an error (they would mix)."""
  path = os.path.join(out_dir, META_NAME)
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    changed = "; ".join(f"{k}: {old.get(k)!r} then, {meta.get(k)!r} now" for k in _IDENTITY
                        if old.get(k) != meta.get(k))
    if changed:
      raise ValueError(f"{out_dir} holds chunks written with other settings ({changed}); use "
                       "another --out or delete the folder.")
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_meta(folder: str) -> dict:
  """The folder's `tokens.json` ({} for chunks written before it existed)."""
  path = os.path.join(folder, META_NAME)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


@dataclasses.dataclass
class TokenGridsConfig(tfds.core.BuilderConfig):
  folder: str = ""  # the chunk directory of phase 1


class TokenGrids(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Token grids gathered from pre-tokenisation chunks.

  Metadata (`builder.info.metadata`): `tokens` (the chunk folder's tokens.json), `min_grid` /
  `max_grid` (smallest / largest frames, rows, cols over all examples of all splits, each axis
  on its own) and `max_text` (longest caption in ids)."""
  name = "token_grids"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = TokenGridsConfig

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "tokens": tfds.features.Tensor(shape=(None, None, None), dtype=np.int32,
                                       encoding="zlib"),
        "name": tfds.features.Text(),
        "caption": tfds.features.Text(),
        "text": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "text_mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
    }), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    root = self.builder_config.folder
    splits = sorted(d for d in os.listdir(root) if glob.glob(os.path.join(root, d, "*.npz")))
    if not splits:
      raise FileNotFoundError(f"{root}: no pre-tokenised chunks; run phase 1 first.")
    shapes, max_text = [], 0
    for path in glob.glob(os.path.join(root, "*", "*.npz")):
      with np.load(path) as chunk:
        if "shapes" in chunk:
          shapes.append(chunk["shapes"])
        else:  # chunks written before shapes were stored
          shapes.append(np.asarray([chunk[f"tokens_{k}"].shape
                                    for k in range(len(chunk["names"]))], np.int32))
        if chunk["text_mask"].size:
          max_text = max(max_text, int(chunk["text_mask"].sum(-1).max()))
    shapes = np.concatenate(shapes)
    self.info.metadata.update(tokens=read_meta(root), max_text=max_text,
                              min_grid=[int(x) for x in shapes.min(0)],
                              max_grid=[int(x) for x in shapes.max(0)])
    return {s: self._generate_examples(os.path.join(root, s)) for s in splits}

  def _generate_examples(self, split_dir):
    for path in sorted(glob.glob(os.path.join(split_dir, "*.npz"))):
      with np.load(path) as chunk:
        for k, name in enumerate(chunk["names"]):
          yield f"{os.path.basename(path)}/{k}", {
              "tokens": chunk[f"tokens_{k}"], "name": str(name),
              "caption": str(chunk["captions"][k]), "text": chunk["text"][k],
              "text_mask": chunk["text_mask"][k]}


datasets.register("token_grids", TokenGrids)


class TokenSource:
  """Token-grid examples for the trainer: {tokens, text, text_mask} (text padded or cut to
  `text_len`)."""

  def __init__(self, source, text_len: int):
    self.source, self.text_len = source, text_len

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    ex = self.source[i]
    text = np.zeros((self.text_len,), np.int32)
    mask = np.zeros((self.text_len,), bool)
    n = min(self.text_len, len(ex["text"]))
    text[:n], mask[:n] = ex["text"][:n], ex["text_mask"][:n]
    return {"tokens": np.asarray(ex["tokens"], np.int32), "text": text, "text_mask": mask}


@dataclasses.dataclass
class TokenDataset:
  """One pre-tokenised dataset of a run."""
  folder: str
  name: str  # the folder's base name, made unique
  builder: Any
  meta: dict  # tokens.json
  min_grid: tuple[int, int, int]
  max_text: int

  @property
  def captioned(self) -> bool:
    return bool(self.meta.get("caption_model_sha256"))


def open_token_datasets(config) -> list[TokenDataset]:
  """The datasets of `config.data.dataset` (comma-separated chunk folders), built if needed."""
  folders = [f.strip() for f in str(config.data.dataset).split(",") if f.strip()]
  if not folders:
    raise ConfigError("config.data.dataset is empty: give the chunk folder written by "
                      "`python -m nuwa_jax.data.pretokenize --out=...` (several, "
                      "comma-separated, to mix them).")
  for folder in folders:
    if not os.path.isdir(folder):
      raise ConfigError(f"config.data.dataset: {folder} is not a folder of pre-tokenised "
                        "chunks (`python -m nuwa_jax.data.pretokenize --out=...`).")
  builders = [datasets.get_builder("token_grids", config.data.data_dir or None, folder=f)
              for f in folders]
  datasets.ensure_built(builders)
  out, names = [], set()
  for folder, builder in zip(folders, builders):
    name = base = os.path.basename(os.path.abspath(folder)) or "tokens"
    while name in names:
      name = f"{base}_{len(names)}"
    names.add(name)
    md = builder.info.metadata or {}
    if "min_grid" not in md:  # a token_grids dataset built before the metadata existed
      shapes = [np.shape(ex["tokens"]) for split in builder.info.splits
                for ex in datasets.data_source(builder, split)]
      md = {"tokens": read_meta(folder), "min_grid": np.min(shapes, 0).tolist(),
            "max_text": 0}
    out.append(TokenDataset(folder, name, builder, dict(md.get("tokens") or {}),
                            tuple(int(x) for x in md["min_grid"]), int(md.get("max_text", 0))))
  return out


def check_config(config, token_datasets: list[TokenDataset]) -> None:
  """Errors (naming the config field) when the model cannot read these datasets."""
  m = config.model
  names = ", ".join(d.folder for d in token_datasets)
  for d in token_datasets:
    codes = d.meta.get("num_codes")
    if codes is None:
      logging.warning("%s has no %s (old chunks): the codebook size is not checked.", d.folder,
                      META_NAME)
    elif codes > m.vocab:
      raise ConfigError(
          f"config.model.vocab={m.vocab} is smaller than the codebook of the tokenizer that "
          f"wrote {d.folder} ({codes} codes, {d.meta.get('tokenizer_workdir')}); set "
          f"--config.model.vocab={codes}.")
    if m.text_len and d.captioned and d.meta.get("caption_vocab", 0) > m.text_vocab:
      raise ConfigError(
          f"config.model.text_vocab={m.text_vocab} is smaller than the caption model of "
          f"{d.folder} ({d.meta['caption_vocab']} pieces, {d.meta.get('caption_model')}); set "
          f"--config.model.text_vocab={d.meta['caption_vocab']}.")
    if m.text_len and d.max_text > m.text_len:
      logging.warning("%s: captions of up to %d ids are cut to config.model.text_len=%d.",
                      d.folder, d.max_text, m.text_len)
    if not m.text_len and d.captioned:
      logging.info("%s is captioned but config.model.text_len=0: captions are not used.",
                   d.folder)
  tokenizers = {d.meta.get("tokenizer_sha256") for d in token_datasets} - {None}
  if len(tokenizers) > 1:
    raise ConfigError(f"config.data.dataset mixes datasets written by different tokenizers "
                      f"({names}): their token ids mean different things.")
  caption_models = {d.meta["caption_model_sha256"] for d in token_datasets if d.captioned}
  if m.text_len and len(caption_models) > 1:
    raise ConfigError(
        f"config.data.dataset mixes datasets captioned with different caption models "
        f"({names}); pre-tokenise them with one shared --caption_model, or set "
        "config.model.text_len=0.")


def token_sources(config):
  """Train / held-out sources of `config.data.dataset` (one or several comma-separated chunk
  folders) for the NUWA-Infinity trainer: `TokenMix`es whose global batches each come from
  one dataset and carry one patch grid of `config.grids` that fits it (see token_grids.py).
  Mismatches between the model and the data are `ConfigError`s raised before compiling."""
  from nuwa_jax.data import token_grids  # pylint: disable=g-import-not-at-top
  m = config.model
  token_datasets = open_token_datasets(config)
  check_config(config, token_datasets)
  patch = (m.patch_rows, m.patch_cols)
  grids = token_grids.grids_per_dataset(
      [tuple(g) for g in config.grids], [d.min_grid for d in token_datasets], patch,
      [d.name for d in token_datasets])
  try:
    weights = [int(w) for w in str(config.data.weights).split(",") if w.strip()] or None
  except ValueError:
    weights = [-1]
  if weights is not None and (len(weights) != len(token_datasets) or min(weights) < 1):
    raise ConfigError(f"config.data.weights={config.data.weights!r}: expected one positive "
                      f"integer per dataset ({len(token_datasets)}), comma-separated.")
  names = [d.name for d in token_datasets]
  train, test = [], []
  for d in token_datasets:
    splits = d.builder.info.splits
    if "test" not in splits:
      logging.warning("%s has no test split: held-out scores use its train split.", d.folder)
    train.append(TokenSource(datasets.data_source(d.builder, "train"), m.text_len))
    test.append(TokenSource(datasets.data_source(d.builder, "test" if "test" in splits
                                                 else "train"), m.text_len))
  for d, g in zip(token_datasets, grids):
    logging.info("token dataset %s: %d train examples, smallest grid %s tokens, grids %s%s",
                 d.name, len(train[names.index(d.name)]), d.min_grid, g,
                 ", captioned" if d.captioned and m.text_len else "")
  return (token_grids.TokenMix(train, names, grids, patch, config.batch_size, config.seed,
                               weights=weights, shuffle=True),
          token_grids.TokenMix(test, names, grids, patch, config.batch_size,
                               config.seed + 10_000, shuffle=False))


def pretokenize(tokenizer_workdir: str, source_builder, out_dir: str, short_side: int,
                chunk_size: int = 64, text_len: int = 0, data_dir: str | None = None,
                caption_model: str | None = None, encoder: Encoder | None = None):
  """Phases 1 and 2; returns the built token_grids builder.

  caption_model: sentencepiece model for the captions (default: the source dataset's own
  `captions.model`); used only when text_len > 0.
  encoder: the tokenizer of `tokenizer_workdir` already loaded (to tokenise several datasets).
  Raises:
    ValueError: the dataset has captions but there is no caption model, or `out_dir` holds
      chunks written with other settings.
  """
  from nuwa_jax.config_utils import load_json  # pylint: disable=g-import-not-at-top
  from nuwa_jax.trainers import vqgan as vqgan_trainer  # pylint: disable=g-import-not-at-top
  config = load_json(os.path.join(tokenizer_workdir, "config.json"))
  if encoder is None:
    encoder = Encoder(*vqgan_trainer.load(config, tokenizer_workdir))
  datasets.ensure_built([source_builder])
  tokenizer = None
  if text_len:
    model_path = caption_model or captions_lib.model_path_for(source_builder)
    if os.path.isfile(model_path):
      tokenizer = captions_lib.CaptionTokenizer(model_path)
    elif caption_model:
      raise ValueError(f"caption model {caption_model} does not exist.")
    else:
      first = datasets.data_source(source_builder, "train")
      if any(first[i].get("caption") for i in range(min(len(first), 16))):
        raise ValueError(
            f"{source_builder.info.full_name} has captions but no caption model "
            f"({model_path}); train one with `python -m nuwa_jax.data.captions`, pass "
            "--caption_model, or pre-tokenise with --text_len=0 (no text).")
  meta = {"tokenizer_workdir": os.path.abspath(tokenizer_workdir),
          "tokenizer_sha256": _sha256_of_params((encoder.params, encoder.stats)),
          "num_codes": int(config.model.num_codes), "factor": int(encoder.factor),
          "short_side": int(short_side), "text_len": int(text_len),
          "source": source_builder.info.full_name,
          "source_dir": os.path.abspath(str(source_builder.data_dir)),  # pixels for evaluation
          "caption_model": tokenizer.model_path if tokenizer else "",
          "caption_model_sha256": _sha256_of_file(tokenizer.model_path) if tokenizer else "",
          "caption_vocab": tokenizer.vocab_size if tokenizer else 0}
  write_meta(out_dir, meta)
  for split in source_builder.info.splits:
    write_chunks(encoder, datasets.data_source(source_builder, split), split, out_dir,
                 short_side, chunk_size, tokenizer, text_len, jax.process_index(),
                 jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("pretokenize chunks written")
  builder = datasets.get_builder("token_grids", data_dir, folder=out_dir)
  datasets.ensure_built([builder])
  return builder


def main(argv):
  del argv
  from nuwa_jax.data import build as build_lib  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  builder = pretokenize(f.tokenizer_workdir, build_lib.builder_from_flags(),
                        os.path.abspath(f.out), f.short_side, f.chunk_size, f.text_len,
                        f.data_dir, f.caption_model)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"{builder.data_dir} {splits} smallest grid {builder.info.metadata['min_grid']}")


if __name__ == "__main__":
  from nuwa_jax.data import build as _build  # pylint: disable=g-import-not-at-top
  _build.define_dataset_flags()
  flags.DEFINE_string("tokenizer_workdir", None, "Workdir of a trained VQGAN.")
  flags.DEFINE_string("out", None, "Folder for the token chunks (input of the token dataset).")
  flags.DEFINE_integer("short_side", 128, "Resize images/frames to this shorter side (px).")
  flags.DEFINE_integer("chunk_size", 64, "Examples per chunk file (the unit of resuming).")
  flags.DEFINE_integer("text_len", 32, "Caption length in ids (0: no captions). A dataset with "
                       "captions needs a caption model (--caption_model or its own).")
  flags.DEFINE_string("caption_model", None, "Sentencepiece model for the captions (default: "
                      "the dataset's captions.model); share one across datasets to mix them.")
  flags.mark_flags_as_required(["tokenizer_workdir", "out"])
  app.run(main)
