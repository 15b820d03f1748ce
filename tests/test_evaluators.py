"""The evaluation layer: evaluators built from config (bad entries named), FID ordering with a
random Inception, every sample-based evaluator end to end on a tiny random model with random
metric networks (finite values, per-sample keys, samples saved as the metric saw them), and
metrics skipped with their reason when weights are missing."""

import os

import jax
import numpy as np
import pytest
from scipy import ndimage

from configs import nuwa_infinity as nuwa_config
from nuwa_jax.config_utils import ConfigError
from nuwa_jax.data import captions as captions_lib
from nuwa_jax.data import datasets, synthetic_scenes
from nuwa_jax.evaluators import common, networks, statistics
from nuwa_jax.evaluators.references import References
from nuwa_jax.evaluators.sampling import Samples, SampleSpec
from nuwa_jax.models import clip, i3d, inception
from nuwa_jax.models import weights as weights_lib
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.trainers import nuwa_infinity
from nuwa_jax.trainers import vqgan as vqgan_trainer

from conftest import tiny_tokenizer_and_captions

VOCAB, TEXT_LEN = 32, 12


class _Echo:
  NEEDS = ()


def test_from_config_names_the_bad_entry():
  preds = {"chains": None, "chain_nll": None, "dataset_names": ()}
  cases = [({"a": {"type": "nosuch"}}, "config.evals.a.type='nosuch'"),
           ({"b": {"every_steps": 3}}, "config.evals.b: no 'type'"),
           ({"c": {"type": "nll", "colour": 1}}, "config.evals.c: unknown setting(s) ['colour']"),
           ({"d": {"type": "fid"}}, "config.evals.d (type fid) needs ['samples', 'references']"),
           ({"e": {"type": "nll", "orders": ("sideways",)}}, "config.evals.e: orders="),
           ({"f": {"type": "nll", "every_steps": -1}}, "every_steps=-1")]
  for evals, message in cases:
    with pytest.raises(ConfigError, match=None) as e:
      common.from_config(evals, preds)
    assert message in str(e.value), (message, str(e.value))
  (entry,) = common.from_config({"n": {"type": "nll", "every_steps": 5}}, preds)
  assert entry.every_steps == 5 and entry.settings["type"] == "nll"
  assert [e.name for e in common.due([entry], 10, 4, False)] == ["n"]
  assert not common.due([entry], 9, 6, False) and common.due([entry], 9, 6, True)


def _scenes(seed, count, size):
  rng = np.random.default_rng(seed)
  return np.stack([synthetic_scenes.random_scene(rng, size, size)[0] for _ in range(count)])


def test_fid_is_zero_for_the_same_set_and_grows_with_blur_then_noise():
  """FID(real, real) = 0 < FID(real, blurred) < FID(real, noise), random-init Inception."""
  net = inception.FIDInception.random(seed=0, batch_size=8)
  real = _scenes(0, 24, 80)
  blurred = np.stack([ndimage.gaussian_filter(x.astype(np.float32), (2, 2, 0)) for x in real])
  noise = np.random.default_rng(1).integers(0, 256, real.shape).astype(np.uint8)

  def stats(images):
    s = statistics.FeatureStats()
    s.update(np.asarray(net(images, resize=False)["pool3"], np.float64))
    return s
  ref = stats(real)
  same = statistics.fid_from_stats(ref, stats(real))
  blur = statistics.fid_from_stats(ref, stats(blurred.astype(np.uint8)))
  noisy = statistics.fid_from_stats(ref, stats(noise))
  assert abs(same) < 1e-6 * max(blur, 1.0), same
  assert 0 < blur < noisy, (blur, noisy)


# ---------------------------------------------------------------------------------------
# Sample-based evaluators on a tiny random model
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluators")
  networks.BATCH.update(inception=4, clip=4, i3d=2)  # small padded batches for tiny tests
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  vq, spm = tiny_tokenizer_and_captions(root, VOCAB)
  vq_model, vq_params, stats = vqgan_trainer.load(vq, str(root / "vqgan"), mesh)
  config = nuwa_config.get_config("size=tiny")
  config.model.update(vocab=VOCAB, patch_rows=2, patch_cols=2, extent=(1, 1, 1), width=32,
                      depth=1, num_heads=2, mlp_dim=64, text_len=TEXT_LEN, text_vocab=64,
                      pool_slots=16)
  layout = nuwa_infinity.make_layout(config, mesh)
  params = layout.sharded.init(jax.random.key(0)).params
  variables = {"params": vq_params, **({"vq_stats": stats} if stats else {})}
  samples = Samples(layout.model, vq_model, variables, captions_lib.CaptionTokenizer(spm),
                    batch=3)
  data_dir = str(root / "tfds")
  scenes = datasets.get_builder("synthetic_scenes", data_dir, height=16, width=16,
                                num_train=2, num_test=6)
  clips = datasets.get_builder("synthetic_clips", data_dir, height=16, width=16, frames=4,
                               num_train=2, num_test=4)
  datasets.ensure_built([scenes, clips])
  refs = References({"scenes": str(scenes.data_dir), "clips": str(clips.data_dir)},
                    str(root / "reference_stats"))
  paths = {}
  net = inception.FIDInception.random(seed=0, batch_size=8)
  paths["inception"] = str(root / "inception.npz")
  weights_lib.save(weights_lib.flatten(net.params), paths["inception"], inception.FORMAT,
                   net.config)
  cfg = clip.CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64,
                        vision_patch_size=16, context_length=77, vocab_size=49408,
                        transformer_width=32, transformer_heads=2, transformer_layers=1)
  paths["clip"] = str(root / "clip.npz")
  clip.CLIPScorer.random(0, cfg).save(paths["clip"])
  paths["i3d"] = str(root / "i3d.npz")
  video_net = i3d.I3DFeatures.random(0, i3d.narrow_config(16))
  weights_lib.save(weights_lib.flatten(video_net.params), paths["i3d"], i3d.FORMAT,
                   video_net.config)
  return {"params": params, "samples": samples, "refs": refs, "paths": paths, "root": root}


def _run(tiny, evals):
  entries = common.from_config(evals, {"samples": tiny["samples"], "references": tiny["refs"]})
  return {e.name: (s, k) for e, s, k, _ in common.run(entries, tiny["params"])}


def test_a_sample_depends_on_its_seed_and_index_only(tiny):
  """Per-sample keys: sample 4 is the same whether drawn alone or in a batch with others."""
  spec = SampleSpec(task="text_to_image", seed=3)
  captions = ["a red circle", "a blue square", "a green triangle", "a white star"]
  together = tiny["samples"](tiny["params"], spec, [1, 2, 4, 7], captions).pixels
  alone = tiny["samples"](tiny["params"], spec, [4], captions[2:3]).pixels
  np.testing.assert_array_equal(together[2], alone[0])
  other = tiny["samples"](tiny["params"], SampleSpec(task="text_to_image", seed=4), [4],
                          captions[2:3]).pixels
  assert not np.array_equal(other[0], alone[0])


def test_every_sample_metric_runs_end_to_end_and_is_finite(tiny):
  p = tiny["paths"]
  tiny["samples"].out_dir = str(tiny["root"] / "saved")
  got = _run(tiny, {
      "fid": dict(type="fid", task="unconditional", dataset="scenes", num_samples=4,
                  height=16, width=16, inception=p["inception"], save_samples=2),
      "block": dict(type="block_fid", task="outpaint", dataset="scenes", num_samples=2,
                    height=16, width=32, block=(8, 8), inception=p["inception"],
                    reference_images=4,
                    bootstrap=5),
      "clip_sim": dict(type="clip_sim", dataset="scenes", num_samples=3, height=16, width=16,
                       clip=p["clip"]),
      "captions": dict(type="captions", dataset="scenes", num_samples=3, height=16, width=16,
                       top_k=8),
      "fvd": dict(type="fvd", task="animate", dataset="clips", num_samples=2, height=16,
                  width=16, frames=4, i3d=p["i3d"], inception=p["inception"]),
  })
  for name, (scalars, skipped) in got.items():
    assert not skipped, (name, skipped)
    assert scalars and all(np.isfinite(v) for v in scalars.values()), (name, scalars)
  assert got["fid"][0]["fid/num_samples"] == 4 and got["fid"][0]["fid/fid"] >= 0
  # Outpainting a 16 x 16 picture to 16 x 32: the given left half (two 8 x 8 blocks a row)
  # is left out of "generated": 2 rows x 2 columns of blocks per sample remain.
  assert got["block"][0]["block/blocks"] == 2 * 4
  assert got["block"][0]["block/block_fid_low"] <= got["block"][0]["block/block_fid"] <= \
      got["block"][0]["block/block_fid_high"]
  assert -1 <= got["clip_sim"][0]["clip_sim/clip_sim"] <= 1
  assert 0 <= got["captions"][0]["captions/exact"] <= got["captions"][0]["captions/score"] + 1
  assert {"fvd/fvd", "fvd/frame_fid"} <= set(got["fvd"][0])
  saved = sorted(os.listdir(tiny["root"] / "saved" / "fid_unconditional"))
  assert saved == ["00000.png", "00001.png"]
  # Reference statistics are cached by key: a second run reads them instead of recomputing.
  cached = sorted(os.listdir(tiny["root"] / "reference_stats"))
  assert cached and tiny["refs"].used_keys
  again = _run(tiny, {"fid": dict(type="fid", task="unconditional", dataset="scenes",
                                  num_samples=4, height=16, width=16,
                                  inception=p["inception"], save_samples=0)})
  assert again["fid"][0]["fid/fid"] == pytest.approx(got["fid"][0]["fid/fid"])
  assert sorted(os.listdir(tiny["root"] / "reference_stats")) == cached


def test_missing_weights_skip_with_the_reason_or_fail_when_strict(tiny):
  evals = {"fid": dict(type="fid", dataset="scenes", num_samples=2, inception="")}
  got = _run(tiny, evals)
  scalars, skipped = got["fid"]
  assert not scalars and "no inception weights given" in skipped["fid/fid"]
  entries = common.from_config(evals, {"samples": tiny["samples"], "references": tiny["refs"]})
  with pytest.raises(common.SkippedError, match="convert_inception"):
    list(common.run(entries, tiny["params"], strict=True))


def test_reference_stats_command_writes_the_file_the_evaluators_read(tiny, tmp_path):
  from nuwa_jax.tools import reference_stats
  cache = str(tmp_path / "cache")
  folder = tiny["refs"].folders["scenes"]
  args = [f"--dataset_dir={folder}", f"--weights={tiny['paths']['inception']}",
          "--size=16,16", "--num=4", f"--cache_dir={cache}"]
  assert reference_stats.main(args) == 0
  (written,) = os.listdir(cache)
  refs = References({"scenes": folder}, cache)
  net = inception.FIDInception.load(tiny["paths"]["inception"], batch_size=4)
  _, _, key = refs.features("scenes", net, "pool3", 4, (16, 16))
  assert written == f"{key}.npz" and os.listdir(cache) == [written]
  assert reference_stats.main(args[:-1] + ["--size=16", f"--cache_dir={cache}"]) == 2
