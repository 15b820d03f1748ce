"""Generation: cached = uncached sampling, given regions kept, every task's output size, resume
equals an uninterrupted run, a pool that does not grow with width, one compile for every
patch/order/size, and bad requests refused before any compute."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import nuwa_infinity as nuwa_config
from nuwa_jax import context_pool
from nuwa_jax import generate as gen
from nuwa_jax import sample as sample_lib
from nuwa_jax.models.nuwa import Model
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.sampler import PatchSampler, SamplingOptions
from nuwa_jax.trainers import nuwa_infinity

from conftest import CompileCounter, save_untrained, subprocess_env, tiny_tokenizer_and_captions

VOCAB, TEXT_LEN = 32, 6


@pytest.fixture(scope="module")
def small_model():
  model = Model(vocab=VOCAB, patch_rows=2, patch_cols=2, extent=(1, 1, 1), width=32, depth=2,
                num_heads=4, mlp_dim=64, text_vocab=40, text_len=TEXT_LEN, pool_slots=16)
  p, k = model.patch_tokens, model.num_context
  params = nn.meta.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, p), jnp.int32), jnp.zeros((2, 1, k, p, 32)),
      jnp.zeros((1, k), bool), jnp.zeros((1, TEXT_LEN), jnp.int32),
      jnp.zeros((1, TEXT_LEN), bool)))["params"]
  # Random, non-trivial offset biases and a sharper head: context and caption both matter.
  rng = np.random.default_rng(0)
  params["offset_bias"] = jnp.asarray(rng.normal(size=params["offset_bias"].shape), jnp.float32)
  params["head"]["kernel"] = params["head"]["kernel"] * 20
  return model, params


TEXT = np.array([[3, 5, 7, 9, 1, 0]], np.int32)


def test_cached_sampling_gives_the_tokens_of_uncached_sampling(small_model):
  model, params = small_model
  for options in (SamplingOptions(), SamplingOptions(temperature=0.8, top_k=8, top_p=0.9,
                                                     guidance=2.5)):
    outs = []
    for cached in (True, False):
      sampler = PatchSampler(model, params, 2, SamplingOptions(**{
          **options.__dict__, "cached": cached}))
      canvas = gen.make_canvas("text_to_image", (2, 2), 2, 4, 12, text=TEXT,
                               text_mask=TEXT > 0)
      outs.append(gen.generate(sampler, canvas, seed=3, progress=False))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert len(np.unique(outs[0])) > 4  # a real sample, not a constant
    assert not np.array_equal(outs[0][0], outs[0][1])  # the batch rows differ


def test_unrolled_model_computes_what_the_scanned_model_computes(small_model):
  """The samplers decode with the layers unrolled (`nuwa.unrolled`): same logits and pool
  entries as the scanned model the params came from."""
  from nuwa_jax.models import nuwa
  model, params = small_model
  flat, flat_params = nuwa.unrolled(model, params)
  assert model.scan_layers and not flat.scan_layers and "layer_1" in flat_params["decoder"]
  rng = np.random.default_rng(1)
  args = (jnp.asarray(rng.integers(0, VOCAB, (2, 4)), jnp.int32),
          jnp.asarray(rng.normal(size=(2, 2, model.num_context, 4, 32)), jnp.float32),
          jnp.asarray(rng.random((2, model.num_context)) < 0.5),
          jnp.asarray(np.repeat(TEXT, 2, 0)), jnp.ones((2, TEXT_LEN), bool))
  for a, b in zip(model.apply({"params": params}, *args),
                  flat.apply({"params": flat_params}, *args)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compact_context_samples_what_one_entry_per_offset_samples(small_model):
  """The sampler's M compact entries (14 of K = 27 for extent (1, 1, 1): rings reach 14) give
  the tokens of attending to all K offsets, on a video canvas where patches have up to 13
  valid entries."""
  model, params = small_model
  canvas = gen.make_canvas("text_to_video", (2, 2), 1, 6, 6, frames=3, text=TEXT)
  assert context_pool.make_schedule(canvas.order, model.extent).max_valid == 13
  outs = []
  for entries in (None, model.num_context):
    sampler = PatchSampler(model, params, 1, SamplingOptions(temperature=0.9), entries=entries)
    outs.append(gen.generate(sampler, canvas, seed=5, progress=False))
  assert sampler.entries == 27 and PatchSampler(model, params, 1).entries == 14
  np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("extent", [(0, 1, 1), (1, 1, 1), (0, 2, 1)])
def test_sampling_context_entries_cover_every_order_on_larger_canvases(extent):
  m = context_pool.sampling_context_entries(extent)
  frames = 4 if extent[0] else 1
  assert m == context_pool.max_valid_context([(frames, 6, 7), (frames, 2, 9)], extent)
  assert m < context_pool.num_offsets(extent)


def test_seed_repeats_and_changes_the_sample(small_model):
  model, params = small_model
  sampler = PatchSampler(model, params, 1)
  canvas = gen.make_canvas("unconditional", (2, 2), 1, 2, 8)
  a, b, c = (gen.generate(sampler, canvas, seed=s, progress=False) for s in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("direction", gen.OUTPAINT_DIRECTIONS)
def test_outpainting_keeps_the_given_tokens(small_model, direction):
  model, params = small_model
  sampler = PatchSampler(model, params, 1)
  given = np.random.default_rng(1).integers(0, VOCAB, (4, 4))
  height, width = {"right": (4, 10), "left": (4, 10), "down": (8, 4), "up": (8, 4),
                   "around": (8, 8)}[direction]
  canvas = gen.make_canvas("outpaint", (2, 2), 1, height, width, given=given,
                           direction=direction)
  out = gen.generate(sampler, canvas, seed=0, progress=False)[0, 0]
  r0 = {"down": 0, "up": 4}.get(direction, (height - 4) // 2 // 2 * 2)
  c0 = {"right": 0, "left": width - 4}.get(direction, (width - 4) // 2 // 2 * 2)
  np.testing.assert_array_equal(out[r0:r0 + 4, c0:c0 + 4], given)
  assert out.shape == (height, width)
  # The given patches come first in the order, the rest is generated.
  n = int(canvas.given.sum())
  assert all(canvas.given[t, r, c] for t, r, c in canvas.order[:n])
  rest = np.ones((height, width), bool)
  rest[r0:r0 + 4, c0:c0 + 4] = False
  assert len(np.unique(out[rest])) > 3


def test_animation_keeps_the_first_frame(small_model):
  model, params = small_model
  sampler = PatchSampler(model, params, 2, SamplingOptions(guidance=2.0))
  given = np.random.default_rng(2).integers(0, VOCAB, (4, 4))
  canvas = gen.make_canvas("animate", (2, 2), 2, 4, 4, frames=3, given=given, text=TEXT)
  out = gen.generate(sampler, canvas, seed=0, progress=False)
  assert out.shape == (2, 3, 4, 4)
  np.testing.assert_array_equal(out[:, 0], np.broadcast_to(given, (2, 4, 4)))
  assert not np.array_equal(out[:, 1], out[:, 0])


def test_resume_after_interruption_equals_an_uninterrupted_run(small_model, tmp_path):
  model, params = small_model
  sampler = PatchSampler(model, params, 2, SamplingOptions(temperature=0.9, guidance=1.5))
  canvas = gen.make_canvas("text_to_image", (2, 2), 2, 4, 16, text=TEXT)
  whole = gen.generate(sampler, canvas, seed=7, out_dir=str(tmp_path / "a"), progress=False)
  units = []
  gen.generate(sampler, canvas, seed=7, out_dir=str(tmp_path / "b"), stop_after=9,
               progress=False, on_unit=lambda u, t, f: units.append(u))
  assert units == [0, 1, 2, 3]  # columns 0-3 finished (2 patches each); patch 9 was lost
  with np.load(tmp_path / "b" / "state.npz") as state:
    assert int(state["done"]) == 8
  resumed = gen.generate(sampler, canvas, seed=7, out_dir=str(tmp_path / "b"), progress=False)
  np.testing.assert_array_equal(resumed, whole)
  # Another request cannot pick up this state.
  other = gen.make_canvas("text_to_image", (2, 2), 2, 4, 16, text=TEXT + 1)
  with pytest.raises(gen.RequestError, match="another request"):
    gen.generate(sampler, other, seed=7, out_dir=str(tmp_path / "b"), progress=False)


def test_pool_entries_do_not_grow_with_width_and_one_compile_serves_all(small_model):
  model, params = small_model
  peaks = {}
  for cols in (8, 16, 32, 64):
    canvas = gen.make_canvas("unconditional", (2, 2), 1, 4, 2 * cols)
    peaks[cols] = context_pool.make_schedule(canvas.order, model.extent).peak_occupancy
  assert len(set(peaks.values())) == 1 and peaks[8] <= model.pool_slots, peaks
  sampler = PatchSampler(model, params, 1)
  with CompileCounter() as counter:
    for task, h, w, kw in (("unconditional", 2, 8, {}), ("unconditional", 4, 20, {}),
                           ("text_to_image", 6, 4, {"text": TEXT}),  # row-major
                           ("text_to_video", 2, 2, {"text": TEXT, "frames": 3})):
      gen.generate(sampler, gen.make_canvas(task, (2, 2), 1, h, w, **kw), progress=False)
  assert not [n for n in counter.names if "sample" in n or "commit" in n], counter.names


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="unconditional", height=3, width=8), "height=3 tokens is not a positive multiple"),
    (dict(task="unconditional", height=2, width=8, text=TEXT), "takes no caption"),
    (dict(task="outpaint", height=4, width=8), "needs a given picture"),
    (dict(task="outpaint", height=4, width=4, given=np.zeros((4, 4), int)), "must be larger"),
    (dict(task="outpaint", height=6, width=8, given=np.zeros((4, 4), int)), "must equal"),
    (dict(task="text_to_video", height=2, width=2, frames=1, text=TEXT), "at least 2"),
    (dict(task="draw", height=2, width=2), "expected one of"),
])
def test_bad_canvas_requests_are_refused(kwargs, message):
  with pytest.raises(gen.RequestError, match=message):
    gen.make_canvas(patch=(2, 2), batch=1, **kwargs)


# ----------------------------------------------------------------------------------------
# Through the command: a tokenizer and a model saved like trained ones
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample")
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  _, spm = tiny_tokenizer_and_captions(root, VOCAB)
  nuwa = nuwa_config.get_config("size=tiny")
  nuwa.model.update(vocab=VOCAB, patch_rows=2, patch_cols=2, extent=(1, 1, 1), width=32,
                    depth=1, num_heads=2, mlp_dim=64, text_len=TEXT_LEN, text_vocab=64,
                    pool_slots=16)
  nuwa.data.tokenizer_workdir = str(root / "vqgan")
  nuwa.data.caption_model = spm
  save_untrained(nuwa_infinity.make_layout(nuwa, mesh), nuwa, str(root / "nuwa"))
  nuwa.model.text_len = 0
  save_untrained(nuwa_infinity.make_layout(nuwa, mesh), nuwa, str(root / "nuwa_no_text"))
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(
      root / "photo.png")
  return root


def _request(root, task, **kw):
  return sample_lib.Request(task=task, checkpoint=str(root / "nuwa"),
                            out=str(root / "out" / task / kw.pop("name", "")), **kw)


def test_every_task_writes_outputs_of_the_requested_size(workdirs):
  root, f = workdirs, 4  # tiny tokenizer: ch_mult (1, 2, 2) = factor 4; patch 2 = 8 px
  loaded = sample_lib.load(_request(root, "text_to_image", text="a red circle"))
  cases = [
      ("unconditional", dict(height=8, width=256), (8, 256), None),  # 32 x its height
      ("text_to_image", dict(height=8, width=24, text="a red circle", guidance=2.0), (8, 24),
       None),
      ("outpaint", dict(height=16, width=48, image=str(root / "photo.png"), direction="left"),
       (16, 48), None),
      ("outpaint", dict(height=24, width=24, image=str(root / "photo.png"),
                        direction="around", name="around"), (24, 24), None),
      ("animate", dict(height=8, width=16, frames=3, image=str(root / "photo.png")), (8, 16), 3),
      ("text_to_video", dict(height=8, width=8, frames=4, text="a blue square"), (8, 8), 4),
  ]
  for task, kw, size, frames in cases:
    result = sample_lib.run(_request(root, task, **kw), loaded)
    out = root / "out" / task / kw.get("name", "")
    assert result["tokens"].shape[-2:] == (size[0] // f, size[1] // f)
    if frames:
      image = np.asarray(Image.open(out / "sample0_frames.png"))
      assert image.shape == (size[0], size[1] * frames, 3)
      assert Image.open(out / "sample0.gif").n_frames == frames
      assert os.path.getsize(out / "sample0.mp4") > 0
    else:
      assert np.asarray(Image.open(out / "sample0.png")).shape == size + (3,)
    assert (out / "contact_sheet.png").exists() and (out / "result.json").exists()
    if task == "unconditional":  # decoded strip by strip as columns finished
      assert len(list((out / "parts").glob("b0_x*.png"))) > 1


def test_command_line_generates_and_refuses_bad_requests(workdirs):
  root = workdirs
  base = [sys.executable, "-m", "nuwa_jax.sample", f"--checkpoint={root / 'nuwa'}"]
  ok = subprocess.run(base + ["--task=text_to_video", "--text=a green star",
                              f"--out={root / 'cli'}", "--height=8", "--width=8",
                              "--frames=2"],
                      env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert (root / "cli" / "sample0.gif").exists()
  for args, message in (
      (["--task=unconditional", "--height=12"], "--height=12 px is not a positive multiple"),
      (["--task=unconditional", "--text=a red circle"], "takes no --text"),
      ([f"--checkpoint={root / 'missing'}", "--task=unconditional"], "no config.json"),
      ([f"--checkpoint={root / 'nuwa_no_text'}", "--task=text_to_image", "--text=a red circle"],
       "has no text encoder"),
      (["--task=outpaint", f"--image={root / 'nope.png'}"], "--image="),
  ):
    bad = subprocess.run(base + args + [f"--out={root / 'bad'}"], env=subprocess_env(1),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr[-2000:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="text_to_image", text="a red circle", width=12), "--width=12 px"),
    (dict(task="text_to_image", text="a red circle", checkpoint="nuwa_no_text"),
     "has no text encoder"),
    (dict(task="unconditional", guidance=3.0), "guidance"),
    (dict(task="animate", image="missing.png"), "--image="),
    (dict(task="unconditional", checkpoint="vqgan"), "not nuwa_infinity"),
])
def test_bad_requests_fail_before_any_compile(workdirs, kwargs, message):
  root = workdirs
  kwargs = dict(kwargs)
  checkpoint = str(root / kwargs.pop("checkpoint", "nuwa"))
  if "image" in kwargs:
    kwargs["image"] = str(root / kwargs["image"])
  request = sample_lib.Request(checkpoint=checkpoint, out=str(root / "bad"), **kwargs)
  with CompileCounter() as counter, pytest.raises(gen.RequestError, match=message):
    sample_lib.run(request)
  assert counter.names == []
