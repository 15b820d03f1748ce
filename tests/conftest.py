"""Tests run on 8 fake CPU devices, without network, in a fixed order of randomness."""

import os
import sys

# Before JAX starts: 8 host devices, CPU only (libtpu from the `tpu` extra must not be probed).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# The AOT tests load libtpu to describe TPU topologies; other JAX processes on the machine may
# hold its lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def repo_root():
  return REPO


def subprocess_env(devices: int = 8) -> dict:
  """Environment for a child JAX process with `devices` CPU devices and this repo importable."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


class CompileCounter:
  """Counts compilations by function name (`jit(step)`, ...) while active (jax_log_compiles)."""

  def __init__(self):
    import logging  # pylint: disable=g-import-not-at-top
    self.names = []
    counter = self

    class _Handler(logging.Handler):
      def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
          counter.names.append(msg.split()[1])
    self._handler, self._logger = _Handler(), logging.getLogger("jax")

  def __enter__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self._logger.addHandler(self._handler)
    jax.config.update("jax_log_compiles", True)
    return self

  def __exit__(self, *exc):
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_log_compiles", False)
    self._logger.removeHandler(self._handler)


def override(config, **overrides):
  """Sets dotted keys of a ConfigDict (`override(c, **{"model.width": 8})`); returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def save_state(state, config, workdir: str, step: int = 1):
  """Saves `state` (and the config) the way a training run does, for tests of the commands
  that read checkpoints."""
  from nuwa_jax.config_utils import write_config  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 1, 10, async_save=False)
  ckpt.maybe_save(step, state, {"batches": step}, force=True)
  ckpt.wait()
  ckpt.close()
  write_config(config, workdir)


def save_untrained(layout, config, workdir: str, step: int = 1):
  """A randomly initialised train state of `layout`, saved like a trained run."""
  import jax  # pylint: disable=g-import-not-at-top
  save_state(layout.sharded.init(jax.random.key(0)), config, workdir, step)


def tiny_tokenizer_and_captions(root, num_codes: int):
  """A random tiny VQGAN (factor 4) saved as a run in root/vqgan, and a sentencepiece caption
  model of synthetic-scene captions (root/captions.model); returns (vqgan config, spm path)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import vqgan as vqgan_config  # pylint: disable=g-import-not-at-top
  from nuwa_jax.data import captions, synthetic_scenes  # pylint: disable=g-import-not-at-top
  from nuwa_jax.runtime import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from nuwa_jax.trainers import vqgan as vqgan_trainer  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  vq = vqgan_config.get_config("size=tiny")
  vq.model.update(ch=8, ch_mult=(1, 2, 2), z_channels=8, embed_dim=8, num_codes=num_codes,
                  mid_attention=False)
  save_untrained(vqgan_trainer.make_layout(vq, mesh), vq, str(root / "vqgan"))
  spm = captions.train_tokenizer(
      [synthetic_scenes.random_scene(np.random.default_rng(i), 32, 32)[1] for i in range(200)],
      str(root / "captions.model"), vocab_size=60)
  return vq, spm
