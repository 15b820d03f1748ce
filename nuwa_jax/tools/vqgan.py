"""Encode pictures and videos into VQGAN token grids, and decode token grids into pictures.

  python -m nuwa_jax.tools.vqgan encode --workdir=w/vqgan --input=photo.jpg --out=photo.npy
  python -m nuwa_jax.tools.vqgan encode --workdir=w/vqgan --input=clip.mp4 --out=clip.npy \
      --short_side=64 --max_frames=16
  python -m nuwa_jax.tools.vqgan encode --workdir=w/vqgan --input=photos/ --out=photos.npz
  python -m nuwa_jax.tools.vqgan decode --workdir=w/vqgan --input=photo.npy --out=photo.png
  python -m nuwa_jax.tools.vqgan decode --workdir=w/vqgan --input=clip.npy --out=clip.mp4 --fps=8
  python -m nuwa_jax.tools.vqgan decode --workdir=w/vqgan --input=clip.npy --out=clip.gif
  python -m nuwa_jax.tools.vqgan decode --workdir=w/vqgan --input=canvas.npy --out=canvas.png \
      --tile=16,16 --overlap=4,4          # any size, e.g. 64 x 4096 tokens, streamed to disk

--workdir is a tokenizer trained by `python -m nuwa_jax.train --config=configs/vqgan.py...`
(its config.json and latest checkpoint are read).

encode: --input is an image file, a video file (decoded with PyAV, tokenised frame by frame)
or a folder of images. Each picture is resized so its shorter side is --short_side pixels
(0: keep the size) and centre-cropped to a multiple of the tokenizer's factor f.
  --out *.npy: one grid, int32 [h, w] for an image, [T, h, w] for a video (not for a folder);
  --out *.npz: names [N] (source files), tokens_0 .. tokens_{N-1} (as above), fps [N] (0 for
  images), factor, num_codes; the same layout as nuwa_jax.data.pretokenize's chunks.
decode: --input is an .npy grid or an .npz of grids (--item picks one; default the only one).
  [h, w] grids -> --out *.png (or *.npy: uint8 [H, W, 3]); [T, h, w] -> *.gif, *.mp4 or
  *.png (frames side by side). With --tile the image is decoded in overlapping tiles of that
  many tokens, keeping the tile centres (nuwa_jax.tiled_decode), one column of tiles at a time
  streamed into an .npy memmap and then into the PNG: memory is bounded by the tile, not the
  canvas. Without --tile the grid is decoded in one call.
Every output is written to a temporary file and renamed into place. Errors (a bad flag, an
unreadable file, a grid that does not fit the tokenizer) print one line naming the flag or the
file and exit with status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a trained VQGAN tokenizer.")
flags.DEFINE_string("input", None, "encode: image, video or folder of images; decode: .npy or "
                    ".npz token grids.")
flags.DEFINE_string("out", None, "Output file: encode .npy|.npz; decode .png|.gif|.mp4|.npy.")
flags.DEFINE_integer("short_side", 0, "encode: resize so the shorter side has this many "
                     "pixels (0: keep the size).")
flags.DEFINE_integer("max_frames", 0, "encode: at most this many video frames (0: all).")
flags.DEFINE_integer("frame_stride", 1, "encode: keep every n-th video frame.")
flags.DEFINE_integer("batch", 8, "Pictures or frames per encode / decode call.")
flags.DEFINE_integer("item", -1, "decode: which grid of an .npz (default: the only one).")
flags.DEFINE_string("tile", "", "decode: tile size in tokens 'rows,cols' (empty: whole grid).")
flags.DEFINE_string("overlap", "", "decode: tokens of context on each side of a tile's kept "
                    "centre, 'rows,cols' (default: a quarter of the tile).")
flags.DEFINE_float("fps", 0.0, "decode: frames per second of GIF/MP4 (default: the .npz's "
                   "fps, else 8).")

COMMANDS = ("encode", "decode")
ENCODE_OUT = (".npy", ".npz")
DECODE_OUT = (".png", ".gif", ".mp4", ".npy")


class CommandError(ValueError):
  """A bad flag or file; the message names it."""


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------

def tmp_path(path: str) -> str:
  """Temporary name beside `path`, same extension (writers pick the format from it)."""
  root, ext = os.path.splitext(path)
  return f"{root}.tmp{os.getpid()}{ext}"


def ensure_parent(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    os.makedirs(parent, exist_ok=True)


def parse_pair(text: str, flag: str) -> tuple[int, int] | None:
  """'16,16' or '16' -> (16, 16); '' -> None."""
  if not text:
    return None
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    raise CommandError(f"--{flag}={text!r}: expected 'rows,cols' integers.") from None
  if len(values) == 1:
    values *= 2
  if len(values) != 2:
    raise CommandError(f"--{flag}={text!r}: expected 'rows,cols' integers.")
  return values[0], values[1]


def extension(path: str, allowed: Sequence[str], flag: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in allowed:
    raise CommandError(f"--{flag}={path!r}: unsupported file type {ext or '(none)'!r}; "
                       f"expected one of {', '.join(allowed)}.")
  return ext


# ----------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------

class Tokenizer:
  """A trained VQGAN loaded from its workdir: jitted encode / decode of batches."""

  def __init__(self, workdir: str):
    import jax  # pylint: disable=g-import-not-at-top

    from nuwa_jax.config_utils import load_json  # pylint: disable=g-import-not-at-top
    from nuwa_jax.models.quantizer import STATS  # pylint: disable=g-import-not-at-top
    from nuwa_jax.trainers import vqgan as trainer  # pylint: disable=g-import-not-at-top
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
      raise CommandError(f"--workdir={workdir!r}: no config.json (expected the workdir of a "
                         "tokenizer trained with configs/vqgan.py).")
    config = load_json(config_path)
    if config.get("trainer") != "vqgan":
      raise CommandError(f"--workdir={workdir!r}: config.json is for trainer "
                         f"{config.get('trainer')!r}, not a VQGAN tokenizer.")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
      raise CommandError(f"--workdir={workdir!r}: no checkpoint under {ckpt_dir}.")
    model, params, stats = trainer.load(config, workdir)
    self.model, self.factor, self.num_codes = model, model.factor, config.model.num_codes
    variables = {"params": params, **({STATS: stats} if stats else {})}
    self._encode = jax.jit(lambda x: model.apply(variables, x, method=model.encode)[1])
    self.decode_indices = lambda t: model.apply(variables, t, method=model.decode_indices)
    self._decode = jax.jit(self.decode_indices)

  def encode(self, frames: np.ndarray, batch: int) -> np.ndarray:
    """uint8 [N, H, W, 3] (H, W multiples of f) -> int32 [N, H/f, W/f]."""
    from nuwa_jax.data.transforms import to_unit_range  # pylint: disable=g-import-not-at-top
    out = [np.asarray(self._encode(to_unit_range(frames[i:i + batch])), np.int32)
           for i in range(0, len(frames), batch)]
    return np.concatenate(out)

  def decode(self, grids: np.ndarray, batch: int) -> np.ndarray:
    """int [N, h, w] -> uint8 [N, h*f, w*f, 3]."""
    from nuwa_jax.runtime.images import to_uint8  # pylint: disable=g-import-not-at-top
    return np.concatenate([to_uint8(np.asarray(self._decode(grids[i:i + batch])))
                           for i in range(0, len(grids), batch)])


# ----------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------

def fit(pixels: np.ndarray, short_side: int, factor: int) -> np.ndarray:
  """Resize to `short_side` (0: keep) and centre-crop to multiples of `factor`."""
  from nuwa_jax.data.pretokenize import fit_to_factor  # pylint: disable=g-import-not-at-top
  h, w = pixels.shape[:2]
  if short_side:
    return fit_to_factor(pixels, short_side, factor)
  if min(h, w) < factor:
    raise CommandError(f"picture of {h}x{w} px is smaller than the tokenizer factor {factor}; "
                       "use --short_side.")
  top, left = (h % factor) // 2, (w % factor) // 2
  return pixels[top:top + h - h % factor, left:left + w - w % factor]


def read_input(path: str, short_side: int, factor: int, max_frames: int,
               frame_stride: int) -> list[tuple[str, np.ndarray, float]]:
  """[(name, uint8 frames [T, H, W, 3] or an image [1, H, W, 3], fps or 0)] of --input."""
  from nuwa_jax.data import media  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise CommandError(f"--input={path!r}: no such file or folder.")
  if os.path.isdir(path):
    files = media.list_files(path, media.IMAGE_EXTENSIONS)
    if not files:
      raise CommandError(f"--input={path!r}: the folder holds no images "
                         f"({', '.join(media.IMAGE_EXTENSIONS)}).")
    return [(os.path.relpath(f, path), fit(media.to_array(media.load_image(f)), short_side,
                                           factor)[None], 0.0) for f in files]
  ext = os.path.splitext(path)[1].lower()
  if ext in media.IMAGE_EXTENSIONS:
    return [(os.path.basename(path),
             fit(media.to_array(media.load_image(path)), short_side, factor)[None], 0.0)]
  if ext in media.VIDEO_EXTENSIONS:
    _, fps, _ = media.video_info(path)
    frames = []
    for i, frame in enumerate(media.iter_frames(path)):
      if i % frame_stride:
        continue
      frames.append(fit(media.to_array(frame), short_side, factor))
      if max_frames and len(frames) >= max_frames:
        break
    if not frames:
      raise CommandError(f"--input={path!r}: the video has no frames.")
    return [(os.path.basename(path), np.stack(frames), fps / frame_stride)]
  raise CommandError(f"--input={path!r}: unsupported file type {ext or '(none)'!r}; expected "
                     f"an image ({', '.join(media.IMAGE_EXTENSIONS)}), a video "
                     f"({', '.join(media.VIDEO_EXTENSIONS)}) or a folder of images.")


def encode(tokenizer: Tokenizer, input_path: str, out: str, short_side: int = 0,
           max_frames: int = 0, frame_stride: int = 1, batch: int = 8) -> str:
  """Encodes --input into --out (.npy or .npz, see the module doc); returns the path."""
  ext = extension(out, ENCODE_OUT, "out")
  if frame_stride < 1 or max_frames < 0 or short_side < 0 or batch < 1:
    raise CommandError("--frame_stride and --batch must be >= 1, --max_frames and "
                       "--short_side >= 0.")
  items = read_input(input_path, short_side, tokenizer.factor, max_frames, frame_stride)
  grids = []
  for name, frames, fps in items:
    tokens = tokenizer.encode(frames, batch)
    grids.append(tokens if fps else tokens[0])
  ensure_parent(out)
  tmp = tmp_path(out)
  if ext == ".npy":
    if len(grids) != 1:
      raise CommandError(f"--out={out!r}: {len(grids)} pictures from folder {input_path!r} "
                         "need an .npz output.")
    np.save(tmp, grids[0])
  else:
    np.savez(tmp, names=np.asarray([n for n, _, _ in items]),
             fps=np.asarray([f for _, _, f in items], np.float32),
             factor=np.asarray(tokenizer.factor), num_codes=np.asarray(tokenizer.num_codes),
             **{f"tokens_{k}": g for k, g in enumerate(grids)})
  os.replace(tmp, out)
  return out


# ----------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------

def read_grid(path: str, item: int) -> tuple[np.ndarray, float]:
  """(int grid [h, w] or [T, h, w], fps or 0) from an .npy or .npz (memory-mapped .npy)."""
  if not os.path.isfile(path):
    raise CommandError(f"--input={path!r}: no such file.")
  ext = extension(path, (".npy", ".npz"), "input")
  try:
    if ext == ".npy":
      if item > 0:
        raise CommandError(f"--item={item}: {path!r} is an .npy holding one grid.")
      return np.load(path, mmap_mode="r", allow_pickle=False), 0.0
    with np.load(path, allow_pickle=False) as f:
      keys = sorted((k for k in f.files if k.startswith("tokens_")),
                    key=lambda k: int(k.split("_")[1]))
      if not keys:
        raise CommandError(f"--input={path!r}: no tokens_<k> arrays in the .npz (found "
                           f"{', '.join(f.files) or 'nothing'}).")
      if item < 0 and len(keys) > 1:
        raise CommandError(f"--input={path!r} holds {len(keys)} token grids (tokens_0 .. "
                           f"tokens_{len(keys) - 1}): choose one with --item.")
      k = max(item, 0)
      if k >= len(keys):
        raise CommandError(f"--item={item}: {path!r} holds {len(keys)} token grids.")
      fps = float(f["fps"][k]) if "fps" in f.files and len(f["fps"]) > k else 0.0
      return np.asarray(f[keys[k]]), fps
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, CommandError):
      raise
    raise CommandError(f"--input={path!r}: not a readable {ext} file "
                       f"({type(e).__name__}: {e}).") from None


def check_grid(grid: np.ndarray, path: str, num_codes: int) -> None:
  if grid.ndim not in (2, 3) or not np.issubdtype(grid.dtype, np.integer):
    raise CommandError(f"--input={path!r}: expected an integer token grid [h, w] or "
                       f"[T, h, w], got {grid.dtype} {tuple(grid.shape)}.")
  if grid.size == 0:
    raise CommandError(f"--input={path!r}: the token grid is empty {tuple(grid.shape)}.")
  lo, hi = int(np.min(grid)), int(np.max(grid))
  if lo < 0 or hi >= num_codes:
    raise CommandError(f"--input={path!r}: tokens range over [{lo}, {hi}] but the tokenizer "
                       f"has {num_codes} codes.")


def write_video(path: str, frames: np.ndarray, fps: float) -> None:
  """uint8 frames [T, H, W, 3] -> MP4 (H.264 when PyAV has it, else MPEG-4 part 2)."""
  from fractions import Fraction  # pylint: disable=g-import-not-at-top

  import av  # pylint: disable=g-import-not-at-top
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  rate = Fraction(fps).limit_denominator(1000)
  with av.open(path, mode="w", format="mp4") as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": "18"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                             format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def decode(tokenizer: Tokenizer, input_path: str, out: str, item: int = -1,
           tile: tuple[int, int] | None = None, overlap: tuple[int, int] | None = None,
           fps: float = 0.0, batch: int = 8) -> str:
  """Decodes the grid(s) of --input into --out (see the module doc); returns the path."""
  from nuwa_jax import tiled_decode  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime import images  # pylint: disable=g-import-not-at-top
  ext = extension(out, DECODE_OUT, "out")
  if batch < 1 or fps < 0:
    raise CommandError("--batch must be >= 1 and --fps >= 0.")
  grid, stored_fps = read_grid(input_path, item)
  check_grid(grid, input_path, tokenizer.num_codes)
  f = tokenizer.factor
  if overlap is not None and tile is None:
    raise CommandError("--overlap needs --tile.")
  if tile is not None:
    overlap = overlap if overlap is not None else (tile[0] // 4, tile[1] // 4)
    try:
      tiled_decode.check_tiling(tile, overlap, f)
    except ValueError as e:
      raise CommandError(f"--tile={tile[0]},{tile[1]} --overlap={overlap[0]},{overlap[1]}: "
                         f"{str(e).removeprefix('decode_tiled: ')}") from None
  ensure_parent(out)
  tmp = tmp_path(out)
  if grid.ndim == 2:
    if ext in (".gif", ".mp4"):
      raise CommandError(f"--out={out!r}: a single [h, w] grid decodes to .png or .npy, not "
                         f"{ext}.")
    if tile is not None and ext == ".png":
      npy = tmp + ".npy"
      try:
        tiled_decode.decode_to_png(tokenizer.decode_indices, grid, tile, overlap, f, tmp,
                                   npy_path=npy, max_batch=batch)
      finally:
        if os.path.exists(npy):
          os.remove(npy)
    elif tile is not None:
      sink = tiled_decode.NpyColumnSink(tmp, grid.shape[0] * f, grid.shape[1] * f)
      tiled_decode.decode_tiled(tokenizer.decode_indices, grid, tile, overlap, f, sink=sink,
                                max_batch=batch)
      sink.close()
      del sink
    else:
      image = tokenizer.decode(np.asarray(grid, np.int32)[None], 1)[0]
      if ext == ".png":
        images.save_png(tmp, image)
      else:
        np.save(tmp, image)
    os.replace(tmp, out)
    return out
  if tile is not None:
    raise CommandError("--tile decodes one [h, w] canvas; a [T, h, w] video grid is decoded "
                       "frame by frame without it.")
  frames = tokenizer.decode(np.asarray(grid, np.int32), batch)
  rate = fps or stored_fps or 8.0
  if ext == ".gif":
    images.save_gif(out, frames, fps=rate)  # temp file + rename inside
    return out
  if ext == ".mp4":
    write_video(tmp, frames, rate)
  elif ext == ".png":
    images.save_png(tmp, images.grid([frames], pad=0))
  else:
    np.save(tmp, frames)
  os.replace(tmp, out)
  return out


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------

def run(argv: Sequence[str]) -> str:
  """Runs one command from parsed flags; argv = [program, command]. Returns the output path."""
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise CommandError(f"expected one command, {' or '.join(COMMANDS)}: python -m "
                       f"nuwa_jax.tools.vqgan encode|decode --workdir=... --input=... "
                       f"--out=... (got {list(argv[1:]) or 'none'}).")
  for name in ("workdir", "input", "out"):
    if not getattr(FLAGS, name):
      raise CommandError(f"--{name} is required.")
  command = argv[1]
  if command == "encode":
    extension(FLAGS.out, ENCODE_OUT, "out")
  else:
    extension(FLAGS.out, DECODE_OUT, "out")
    tile, overlap = parse_pair(FLAGS.tile, "tile"), parse_pair(FLAGS.overlap, "overlap")
  tokenizer = Tokenizer(FLAGS.workdir)
  if command == "encode":
    return encode(tokenizer, FLAGS.input, FLAGS.out, FLAGS.short_side, FLAGS.max_frames,
                  FLAGS.frame_stride, FLAGS.batch)
  return decode(tokenizer, FLAGS.input, FLAGS.out, FLAGS.item, tile, overlap, FLAGS.fps,
                FLAGS.batch)


def main(argv: Sequence[str]) -> None:
  from nuwa_jax.data.media import MediaError  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime.logs import quiet_library_logs  # pylint: disable=g-import-not-at-top
  quiet_library_logs()
  try:
    path = run(argv)
  except (CommandError, MediaError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(os.path.abspath(path))


if __name__ == "__main__":
  app.run(main)
