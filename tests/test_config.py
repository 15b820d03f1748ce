"""Configs: variants, overrides, and clear errors before anything is compiled."""

import json
import subprocess
import sys

import pytest

from configs import baseline as baseline_config
from nuwa_jax.config_utils import ConfigError, parse_variant
from nuwa_jax.runtime.mesh import MeshConfigError
from nuwa_jax.trainers import baseline

from conftest import subprocess_env


def test_variants_parse_and_reject_unknown_keys():
  v = parse_variant("size=small,steps=7,runlocal", size="tiny", steps=0, runlocal=False)
  assert (v.size, v.steps, v.runlocal) == ("small", 7, True)
  with pytest.raises(ConfigError, match="variant 'szie' is unknown"):
    parse_variant("szie=tiny", size="tiny")
  with pytest.raises(ConfigError, match="size='huge'"):
    baseline_config.get_config("size=huge")
  assert baseline_config.get_config("size=tiny,steps=5").total_steps == 5


@pytest.mark.parametrize("size", ["tiny", "small", "1b"])
def test_every_size_validates_on_its_intended_device_count(size):
  config = baseline_config.get_config(f"size={size}")
  baseline.validate(config, num_devices=8 if size != "1b" else 256)


@pytest.mark.parametrize("key,value,match", [
    ("model.num_heads", 3, "not divisible by config.model.num_heads=3"),
    ("optimizer.lr", -1.0, "config.optimizer.lr=-1.0"),
    ("optimizer.decay", "cosin", "config.optimizer.decay='cosin'"),
    ("model.dtype", "float16", "config.model.dtype='float16'"),
    ("batch_size", 12, "batch_size=12 is not divisible by the 8 data-parallel"),
])
def test_bad_values_are_config_errors(key, value, match):
  config = baseline_config.get_config("size=tiny")
  section, _, leaf = key.rpartition(".")
  (config[section] if section else config)[leaf] = value
  with pytest.raises(ConfigError, match=match):
    baseline.validate(config, num_devices=8)


def test_bad_mesh_is_an_error():
  config = baseline_config.get_config("size=tiny")
  config.mesh.fsdp = 3
  with pytest.raises(MeshConfigError, match="does not divide the 8 devices"):
    baseline.validate(config, num_devices=8)


def _train(repo_root, tmp_path, *flags, config="configs/baseline.py:size=tiny"):
  cmd = [sys.executable, "-m", "nuwa_jax.train", f"--config={config}",
         f"--workdir={tmp_path / 'w'}", *flags]
  return subprocess.run(cmd, cwd=repo_root, env=subprocess_env(8), capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("flag,match", [
    ("--config.optimizer.lrr=1", "'lrr'"),
    ("--config.optimizer.lr=abc", "could not convert string to float: 'abc'"),
    ("--config.model.num_heads=3", "not divisible by config.model.num_heads=3"),
    ("--config.mesh.fsdp=3", "does not divide the 8 devices"),
])
def test_command_line_errors_are_one_clear_line(repo_root, tmp_path, flag, match):
  result = _train(repo_root, tmp_path, flag)
  assert result.returncode == 2, result.stderr[-2000:]
  assert match in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w" / "config.json").exists()


def test_bad_variant_on_the_command_line_is_one_clear_line(repo_root, tmp_path):
  result = _train(repo_root, tmp_path, config="configs/baseline.py:size=huge")
  assert result.returncode == 2
  assert "size='huge': expected one of ['tiny', 'small', '1b']" in result.stderr
  assert "Traceback" not in result.stderr


def test_resolved_config_is_written_to_the_workdir(repo_root, tmp_path):
  result = _train(repo_root, tmp_path, "--config.total_steps=2", "--config.optimizer.lr=3e-4",
                  "--config.evals.held_out.num_batches=1")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "w" / "config.json") as f:
    written = json.load(f)
  assert written["optimizer"]["lr"] == 3e-4 and written["total_steps"] == 2
  assert written["trainer"] == "baseline"
