"""Generation for the five tasks: `python -m nuwa_jax.sample --task=... --checkpoint=... --out=...`.

  python -m nuwa_jax.sample --task=unconditional --checkpoint=w/nuwa --out=out/pano \
      --height=32 --width=1024
  python -m nuwa_jax.sample --task=outpaint --image=photo.png --direction=right \
      --checkpoint=w/nuwa --out=out/outpaint --height=64 --width=256
  python -m nuwa_jax.sample --task=text_to_image --text="a red circle left of a blue square" \
      --checkpoint=w/nuwa --out=out/t2i --guidance=3
  python -m nuwa_jax.sample --task=animate --image=photo.png --frames=8 ...
  python -m nuwa_jax.sample --task=text_to_video --text="..." --frames=8 ...

From Python: `nuwa_jax.sample.run(Request(task=..., checkpoint=..., out=...))`.

--checkpoint is a NUWA-Infinity workdir (config.json + checkpoints/); its tokenizer is the
VQGAN workdir named in its config (`data.tokenizer_workdir`) unless --tokenizer is given;
captions are encoded with --spm (default: `data.caption_model` of the config). Sizes are in
pixels and must be multiples of the patch (patch tokens x the tokenizer's factor). All
requests are checked before anything is compiled.

Outputs in --out: `sample<b>.png` (images) or `sample<b>.gif` / `.mp4` and `frames/` (videos),
`tokens.npy`, `contact_sheet.png`, `state.npz` (resume: rerunning the same command after an
interruption continues where it stopped and gives the same result). Finished columns
(column-wise orders) and frames are decoded as they complete, with the tiled decoder.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

from nuwa_jax import generate as gen
from nuwa_jax.generate import RequestError

TILE = (16, 16)  # tokens per decoded tile (rows, cols)
OVERLAP = (4, 4)


@dataclasses.dataclass
class Request:
  task: str
  checkpoint: str
  out: str
  height: int = 0  # pixels; 0 = the task's default
  width: int = 0
  frames: int = 8
  image: str = ""
  direction: str = "right"
  text: str = ""
  tokenizer: str = ""
  spm: str = ""
  batch: int = 1
  seed: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  guidance: float = 1.0
  cached: bool = True
  fps: float = 4.0
  stop_after: int = 0  # stop after this many patches (as if interrupted); 0 = run to the end


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------

def _load_config(workdir: str, what: str):
  from nuwa_jax.config_utils import load_json  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RequestError(f"{what}={workdir}: no config.json there (expected a training workdir).")
  if not glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")):
    raise RequestError(f"{what}={workdir}: no checkpoints/ in it (train first).")
  return load_json(path)


def _token_metas(config) -> list[dict]:
  """tokens.json of each pre-tokenised dataset the model was trained on (tokenizer workdir and
  caption model, when the config does not name them)."""
  from nuwa_jax.data import pretokenize  # pylint: disable=g-import-not-at-top
  if config.data.get("name") != "token_grids":
    return []
  return [pretokenize.read_meta(f) for f in config.data.get("dataset", "").split(",") if f]


@dataclasses.dataclass
class Loaded:
  config: Any
  model: Any
  params: Any
  vq_model: Any
  vq_variables: Any
  factor: int
  captions: Any  # CaptionTokenizer or None
  abstract_params: Any = None
  samplers: dict = dataclasses.field(default_factory=dict)  # (batch, options) → PatchSampler

  def sampler(self, batch: int, options):
    """A compiled sampler, shared by the requests served with this model."""
    from nuwa_jax.sampler import PatchSampler  # pylint: disable=g-import-not-at-top
    if (batch, options) not in self.samplers:
      self.samplers[(batch, options)] = PatchSampler(self.model, self.params, batch, options)
    return self.samplers[(batch, options)]


def _tokenizer_dir(config, given: str = "", metas: list[dict] | None = None) -> str:
  """The VQGAN workdir: given, else the config's, else the one its token datasets name."""
  metas = _token_metas(config) if metas is None else metas
  return given or config.data.get("tokenizer_workdir", "") or next(
      (meta["tokenizer_workdir"] for meta in metas if meta.get("tokenizer_workdir")), "")


def load_parts(config, tokenizer: str = "", spm: str = "", text: bool = False) -> Loaded:
  """The NUWA model (without parameters), the VQGAN and the caption tokenizer of a config."""
  import jax  # pylint: disable=g-import-not-at-top
  from nuwa_jax.data import captions as captions_lib  # pylint: disable=g-import-not-at-top
  from nuwa_jax.models.quantizer import STATS  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from nuwa_jax.trainers import nuwa_infinity  # pylint: disable=g-import-not-at-top
  from nuwa_jax.trainers import vqgan as vqgan_trainer  # pylint: disable=g-import-not-at-top
  metas = _token_metas(config)
  tokenizer_dir = _tokenizer_dir(config, tokenizer, metas)
  if not tokenizer_dir:
    raise RequestError("no tokenizer: pass --tokenizer=VQGAN_WORKDIR (the checkpoint's config "
                       "has no data.tokenizer_workdir).")
  vq_config = _load_config(tokenizer_dir, "--tokenizer")
  m = config.model
  if vq_config.model.num_codes != m.vocab:
    raise RequestError(f"tokenizer {tokenizer_dir} has {vq_config.model.num_codes} codes but the "
                       f"model's vocabulary is {m.vocab}.")
  spm = spm or config.data.get("caption_model", "") or next(
      (meta["caption_model"] for meta in metas if meta.get("caption_model")), "")
  if text and (not spm or not os.path.isfile(spm)):
    raise RequestError(f"--text needs the caption tokenizer: --spm={spm or '(unset)'} is not "
                       "a file (captions.model of the training dataset).")
  captions = captions_lib.CaptionTokenizer(spm) if m.text_len and spm and os.path.isfile(
      spm) else None
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  layout = nuwa_infinity.make_layout(config, mesh)
  vq_model, vq_params, stats = vqgan_trainer.load(vq_config, tokenizer_dir, mesh)
  variables = {"params": vq_params, **({STATS: stats} if stats else {})}
  loaded = Loaded(config, layout.model, None, vq_model, variables, vq_model.factor, captions)
  loaded.abstract_params = layout.sharded.abstract.params
  return loaded


def load(request: Request) -> Loaded:
  """NUWA model + params, the VQGAN and the caption tokenizer of a request (checked)."""
  from nuwa_jax.runtime.checkpoint import restore_params  # pylint: disable=g-import-not-at-top
  config = _load_config(request.checkpoint, "--checkpoint")
  if config.get("trainer") != "nuwa_infinity":
    raise RequestError(f"--checkpoint={request.checkpoint} holds a {config.get('trainer')!r} "
                       "model, not nuwa_infinity.")
  m = config.model
  if request.text and not m.text_len:
    raise RequestError(f"--text given but the model in {request.checkpoint} has no text "
                       "encoder (model.text_len 0).")
  # Sizes are checked before anything is loaded; the factor comes from the tokenizer's config.
  tokenizer_dir = _tokenizer_dir(config, request.tokenizer)
  if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "config.json")):
    factor = 2 ** (len(_load_config(tokenizer_dir, "--tokenizer").model.ch_mult) - 1)
    check_sizes(request, (m.patch_rows * factor, m.patch_cols * factor))
  loaded = load_parts(config, request.tokenizer, request.spm, bool(request.text))
  loaded.params = restore_params(os.path.join(request.checkpoint, "checkpoints"),
                                 loaded.abstract_params)
  return loaded


# ----------------------------------------------------------------------------------------
# Decoding as units complete
# ----------------------------------------------------------------------------------------

class Decoder:
  """Token grids → pixels with the tokenizer: finished column strips (tiled, seam-free up to
  the decoder's receptive field) or whole frames, written as PNGs when they complete."""

  def __init__(self, loaded: Loaded, out: str, canvas: gen.Canvas, fps: float = 4.0):
    import jax  # pylint: disable=g-import-not-at-top
    from nuwa_jax import tiled_decode  # pylint: disable=g-import-not-at-top
    self.loaded, self.out, self.canvas, self.f = loaded, out, canvas, loaded.factor
    self.fps = fps
    vq, variables = loaded.vq_model, loaded.vq_variables
    self._decode = jax.jit(lambda t: tiled_decode.to_uint8(
        vq.apply(variables, t, method=vq.decode_indices)))
    _, _, hq, wq = canvas.tokens.shape
    self.th, self.tw = min(TILE[0], hq), min(TILE[1], wq)
    oh = OVERLAP[0] if hq > self.th else 0
    ow = OVERLAP[1] if wq > self.tw else 0
    self.rows = tiled_decode.tile_starts(hq, self.th, oh)
    self.row_keep = tiled_decode.kept_ranges(hq, self.th, self.rows)
    self.cols = tiled_decode.tile_starts(wq, self.tw, ow)
    self.col_keep = tiled_decode.kept_ranges(wq, self.tw, self.cols)
    os.makedirs(os.path.join(out, "parts"), exist_ok=True)

  def _part(self, b: int, name: str) -> str:
    return os.path.join(self.out, "parts", f"b{b}_{name}.png")

  def _tile_column(self, tokens: np.ndarray, c0: int, x_lo: int, x_hi: int) -> np.ndarray:
    """Pixels [B, Hq*f, (x_hi - x_lo)*f, 3] of kept columns [x_lo, x_hi) of a 2-D canvas."""
    f = self.f
    tiles = np.stack([tokens[:, r0:r0 + self.th, c0:c0 + self.tw] for r0 in self.rows], 1)
    b, n = tiles.shape[:2]
    pixels = np.asarray(self._decode(tiles.reshape(b * n, self.th, self.tw)))
    pixels = pixels.reshape(b, n, *pixels.shape[1:])
    return np.concatenate([pixels[:, i, (y_lo - r0) * f:(y_hi - r0) * f,
                                  (x_lo - c0) * f:(x_hi - c0) * f]
                           for i, (r0, (y_lo, y_hi)) in enumerate(zip(self.rows, self.row_keep))],
                          axis=1)

  def on_unit(self, unit: int, tokens: np.ndarray, finished: np.ndarray) -> None:
    from nuwa_jax.runtime.images import save_png  # pylint: disable=g-import-not-at-top
    c = self.canvas
    if c.unit == "frames":
      if not os.path.exists(self._part(c.batch - 1, f"f{unit:04d}")):
        frames = self._whole(tokens[:, unit])
        for b in range(c.batch):
          save_png(self._part(b, f"f{unit:04d}"), frames[b])
      return
    if c.unit != "columns":
      return
    done_cols = np.repeat(finished[0].all(axis=0), c.patch[1])  # token columns finished
    for c0, (x_lo, x_hi) in zip(self.cols, self.col_keep):
      name = f"x{x_lo * self.f:07d}"
      if os.path.exists(self._part(c.batch - 1, name)) or not done_cols[c0:c0 + self.tw].all():
        continue
      strip = self._tile_column(tokens[:, 0], c0, x_lo, x_hi)
      for b in range(c.batch):
        save_png(self._part(b, name), strip[b])

  def _whole(self, grids: np.ndarray) -> np.ndarray:
    """[B, Hq, Wq] → [B, H, W, 3] in column strips (all tiles)."""
    return np.concatenate([self._tile_column(grids, c0, lo, hi)
                           for c0, (lo, hi) in zip(self.cols, self.col_keep)], axis=2)

  def finish(self, tokens: np.ndarray) -> dict[str, list[str]]:
    """Assembles the parts into the outputs; returns their paths."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from nuwa_jax.runtime import images  # pylint: disable=g-import-not-at-top
    c, out = self.canvas, {"png": [], "gif": [], "mp4": []}
    for b in range(c.batch):
      if c.unit == "frames":
        frames = np.stack([np.asarray(Image.open(self._part(b, f"f{t:04d}")))
                           for t in range(c.grid[0])])
        out["gif"].append(images.save_gif(os.path.join(self.out, f"sample{b}.gif"), frames,
                                          self.fps))
        out["mp4"].append(images.save_mp4(os.path.join(self.out, f"sample{b}.mp4"), frames,
                                          self.fps))
        out["png"].append(images.save_png(os.path.join(self.out, f"sample{b}_frames.png"),
                                          np.concatenate(list(frames), axis=1)))
        continue
      if c.unit == "columns":
        parts = sorted(glob.glob(self._part(b, "x*")))
        image = np.concatenate([np.asarray(Image.open(p)) for p in parts], axis=1)
      else:
        image = self._whole(tokens[b:b + 1, 0])[0]
      out["png"].append(images.save_png(os.path.join(self.out, f"sample{b}.png"), image))
    return out



# ----------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------

DEFAULT_SIZE = {  # (height, width) in patches
    "unconditional": (1, 32), "text_to_image": (1, 2), "outpaint": (1, 4),
    "animate": (1, 1), "text_to_video": (1, 1)}


def _given_tokens(loaded: Loaded, request: Request, height: int, width: int) -> np.ndarray:
  """The picture of --image, resized and centre-cropped, encoded to a token grid."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from nuwa_jax.data import media  # pylint: disable=g-import-not-at-top
  from nuwa_jax.data.pretokenize import Encoder  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(request.image):
    raise RequestError(f"--image={request.image or '(unset)'} is not a file.")
  try:
    image = media.load_image(request.image).convert("RGB")
  except Exception as e:  # pylint: disable=broad-except
    raise RequestError(f"--image={request.image}: cannot read it as a picture ({e}).") from e
  m, f = loaded.config.model, loaded.factor
  unit = (m.patch_rows * f, m.patch_cols * f)
  if request.task == "animate":
    target = (height, width)
  elif request.direction in ("right", "left"):
    target = (height, None)
  elif request.direction in ("down", "up"):
    target = (None, width)
  else:  # around: the picture fills the middle half of the canvas height
    target = (max(unit[0], (height // 2) // unit[0] * unit[0]), None)
  th, tw = target
  scale = max(th / image.height if th else 0, tw / image.width if tw else 0)
  w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
  image = image.resize((w, h), Image.BICUBIC)
  th = th or h // unit[0] * unit[0]
  tw = tw or w // unit[1] * unit[1]
  if request.task != "animate" and request.direction in ("right", "left"):
    tw = min(tw, (width - unit[1]) // unit[1] * unit[1])
  if request.task != "animate" and request.direction in ("down", "up"):
    th = min(th, (height - unit[0]) // unit[0] * unit[0])
  if request.direction == "around" and request.task != "animate":
    tw = min(tw, max(unit[1], (width // 2) // unit[1] * unit[1]))
  if th < unit[0] or tw < unit[1]:
    raise RequestError(f"--image={request.image}: too small for one patch ({unit} px).")
  left, top = (w - tw) // 2, (h - th) // 2
  pixels = np.asarray(image.crop((left, top, left + tw, top + th)))[None]
  encoder = Encoder(loaded.vq_model, loaded.vq_variables["params"],
                    loaded.vq_variables.get("vq_stats"))
  return encoder(pixels)[0], pixels[0]


def check_sizes(request: Request, patch_px: tuple[int, int]) -> tuple[int, int]:
  """(height, width) in pixels, defaults filled in; errors name the flag."""
  dh, dw = DEFAULT_SIZE.get(request.task, (1, 1))
  height = request.height or dh * patch_px[0]
  width = request.width or dw * patch_px[1]
  for name, value, unit in (("--height", height, patch_px[0]), ("--width", width, patch_px[1])):
    if value <= 0 or value % unit:
      raise RequestError(f"{name}={value} px is not a positive multiple of the patch "
                         f"({unit} px = patch tokens x tokenizer factor).")
  return height, width


def run(request: Request, loaded: Loaded | None = None) -> dict[str, Any]:
  """Serves one request; returns {'tokens', 'paths', 'scores', 'seconds', ...}."""
  from nuwa_jax.runtime import images  # pylint: disable=g-import-not-at-top
  from nuwa_jax.sampler import SamplingOptions  # pylint: disable=g-import-not-at-top
  if request.task not in gen.TASKS:
    raise RequestError(f"--task={request.task!r}: expected one of {gen.TASKS}.")
  if request.task == "unconditional" and request.text:
    raise RequestError("--task=unconditional takes no --text (use text_to_image).")
  if request.task in ("text_to_image", "text_to_video") and not request.text:
    raise RequestError(f"--task={request.task} needs --text.")
  if request.task in ("outpaint", "animate") and not request.image:
    raise RequestError(f"--task={request.task} needs --image.")
  if request.batch < 1:
    raise RequestError(f"--batch={request.batch}: expected >= 1.")
  options = SamplingOptions(request.temperature, request.top_k, request.top_p,
                            request.guidance, request.cached)
  try:
    options.check(2 ** 31, bool(request.text))
  except ValueError as e:
    raise RequestError(f"{e} (--temperature/--top_k/--top_p/--guidance)") from e
  loaded = loaded or load(request)
  m = loaded.config.model
  try:
    options.check(m.vocab, bool(m.text_len) and bool(request.text))
  except ValueError as e:
    raise RequestError(str(e)) from e
  patch_px = (m.patch_rows * loaded.factor, m.patch_cols * loaded.factor)
  height, width = check_sizes(request, patch_px)
  video = request.task in ("animate", "text_to_video")
  given = given_pixels = None
  if request.image:
    given, given_pixels = _given_tokens(loaded, request, height, width)
  text = text_mask = None
  if request.text and loaded.captions is None:
    raise RequestError("--text given but no caption tokenizer is loaded (--spm).")
  if request.text:
    text, text_mask = loaded.captions.encode([request.text], m.text_len)
  canvas = gen.make_canvas(request.task, (m.patch_rows, m.patch_cols), request.batch,
                           height // loaded.factor, width // loaded.factor,
                           request.frames if video else 1, given, request.direction, text,
                           text_mask)
  os.makedirs(request.out, exist_ok=True)
  t0 = time.time()
  sampler = loaded.sampler(request.batch, options)
  decoder = Decoder(loaded, request.out, canvas)
  decoder.loaded_fps = request.fps
  compile_s = time.time() - t0
  t0 = time.time()
  tokens = gen.generate(sampler, canvas, request.seed, request.out, decoder.on_unit,
                        request.stop_after or None)
  gen_s = time.time() - t0
  result = {"tokens": tokens, "canvas": canvas, "seconds": gen_s, "compile_seconds": compile_s,
            "patches": len(canvas.order), "scores": []}
  if request.stop_after and request.stop_after < len(canvas.order):
    return result  # interrupted on purpose: outputs come with the resumed run
  np.save(os.path.join(request.out, "tokens.npy"), tokens)
  paths = decoder.finish(tokens)
  result["paths"] = paths
  result["scores"] = score(request, paths)
  result["given_pixels"] = given_pixels
  sheet = sheet_items(request, result, loaded.factor)
  paths["contact_sheet"] = images.contact_sheet(os.path.join(request.out, "contact_sheet.png"),
                                                sheet)
  summary = {k: v for k, v in result.items() if k not in ("tokens", "canvas", "given_pixels")}
  tmp = os.path.join(request.out, f"result.json.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump({"request": dataclasses.asdict(request), **summary}, f, indent=1, default=str)
  os.replace(tmp, os.path.join(request.out, "result.json"))
  return result


def sheet_items(request: Request, result: dict, factor: int) -> list[tuple]:
  """Contact-sheet cells of a request: the real input picture (if any), then each sample,
  labelled with its task, caption or input and score, the given part outlined in red."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  what = f'"{request.text}"' if request.text else ""
  if request.image:
    what += (" " if what else "") + f"input {os.path.basename(request.image)}"
  items = []
  if result.get("given_pixels") is not None:
    items.append((f"{request.task}: real input {os.path.basename(request.image)}",
                  result["given_pixels"]))
  box = result["canvas"].given_box(factor)
  for b, path in enumerate(result["paths"]["png"]):
    label = f"{request.task} sample {b}" + (f": {what}" if what else "")
    if result["scores"]:
      label += f" (score {result['scores'][b]['score']:.2f})"
    if box:
      label += " [given part in red]"
    items.append((label, np.asarray(Image.open(path).convert("RGB")), [box] if box else []))
  return items


def score(request: Request, paths: dict) -> list[dict]:
  """Synthetic-scene scores of text tasks whose caption the scorer understands, else []."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from nuwa_jax.data import media, synthetic_scenes  # pylint: disable=g-import-not-at-top
  if request.task not in ("text_to_image", "text_to_video"):
    return []
  out = []
  try:
    for b in range(request.batch):
      if request.task == "text_to_image":
        r = synthetic_scenes.score_image(np.asarray(Image.open(paths["png"][b])), request.text)
      else:
        clip = np.stack([media.to_array(f) for f in media.iter_frames(paths["mp4"][b])])
        r = synthetic_scenes.score_clip(clip, request.text)
      out.append({"score": r.score, "exact": r.exact, "parts": r.parts})
  except ValueError as e:  # not a synthetic caption
    logging.info("no score: %s", e)
    return []
  return out


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

_FLAGS = {f.name: f for f in dataclasses.fields(Request)}
_HELP = {"task": f"one of {gen.TASKS}", "checkpoint": "NUWA-Infinity training workdir",
         "out": "output directory", "height": "pixels (0: task default)",
         "width": "pixels (0: task default)", "frames": "video frames",
         "image": "picture for outpaint / animate", "direction": "outpaint direction: "
         f"{gen.OUTPAINT_DIRECTIONS}", "text": "caption", "tokenizer": "VQGAN workdir "
         "(default: the checkpoint's data.tokenizer_workdir)", "spm": "caption sentencepiece "
         "model (default: the checkpoint's data.caption_model)", "batch": "samples at once",
         "seed": "random seed", "temperature": "0 = greedy", "top_k": "0 = off",
         "top_p": "1 = off", "guidance": "classifier-free guidance scale (1 = off)",
         "cached": "key/value cache (off: recompute every token)", "fps": "video frame rate",
         "stop_after": "stop after N patches (testing resume)"}


def define_flags() -> None:
  """The command's flags, one per Request field (defined only when run as a command)."""
  kinds = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "bool": flags.DEFINE_bool}
  for name, field in _FLAGS.items():
    default = None if field.default is dataclasses.MISSING else field.default
    kinds[field.type](name, default, _HELP[name])
  flags.mark_flags_as_required(["task", "checkpoint", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from nuwa_jax.runtime.logs import quiet_library_logs  # pylint: disable=g-import-not-at-top
  quiet_library_logs()
  request = Request(**{name: flags.FLAGS[name].value for name in _FLAGS})
  try:
    result = run(request)
  except RequestError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("%d patches in %.1f s (+%.1f s compile); outputs: %s; scores: %s",
               result["patches"], result["seconds"], result["compile_seconds"],
               result.get("paths"), result["scores"])


if __name__ == "__main__":
  define_flags()
  app.run(main)
