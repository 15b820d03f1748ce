"""Checkpoints: restore onto other meshes, resume equals an uninterrupted run, pre-emption."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import baseline as baseline_config
from nuwa_jax.data.pipeline import HostBatchIterator
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.runtime.checkpoint import Checkpointer
from nuwa_jax.trainers import baseline

from conftest import CompileCounter, override, subprocess_env


def tiny_config(**overrides):
  config = baseline_config.get_config("size=tiny")
  config.log_every_steps = 1
  return override(config, **overrides)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_restore_onto_other_meshes_and_device_counts(tmp_path):
  config = tiny_config()
  layouts = [({"data": 1, "fsdp": 4, "tensor": 2}, None),
             ({"data": 1, "fsdp": 2, "tensor": 4}, None),
             ({"data": 1}, jax.devices()[:1])]
  mesh = mesh_lib.create_mesh(layouts[0][0], layouts[0][1])
  sharded = baseline.make_layout(config, mesh).sharded
  state = sharded.init(jax.random.key(3))
  # Make the optimizer state non-trivial so that its restore is checked too.
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
  expected = jax.device_get(state)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2)
  ckpt.maybe_save(7, state, {"batches": 7}, force=True)
  ckpt.wait()

  for mesh_cfg, devices in layouts[1:]:
    mesh = mesh_lib.create_mesh(mesh_cfg, devices)
    target = baseline.make_layout(config, mesh).sharded
    restored, data_state, step = ckpt.restore(target.abstract)
    assert step == 7 and data_state == {"batches": 7}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    shardings = jax.tree.map(lambda a: a.sharding, restored)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a == b, shardings, target.shardings))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a == b, shardings, target.shardings)))
    assert {d for a in jax.tree.leaves(restored) for d in a.devices()} == set(
        mesh.devices.flat)
  ckpt.close()


def test_half_written_checkpoint_is_never_read(tmp_path):
  config = tiny_config()
  mesh = mesh_lib.create_mesh({"data": -1})
  sharded = baseline.make_layout(config, mesh).sharded
  state = sharded.init(jax.random.key(0))
  directory = tmp_path / "ckpt"
  ckpt = Checkpointer(str(directory), every_steps=1, keep=3)
  ckpt.maybe_save(2, state, {"batches": 2}, force=True)
  ckpt.wait()
  ckpt.close()
  # A save that died half-way leaves only a temporary directory behind.
  (directory / "5.orbax-checkpoint-tmp-1234").mkdir()
  (directory / "5.orbax-checkpoint-tmp-1234" / "garbage").write_text("x")
  ckpt = Checkpointer(str(directory), every_steps=1, keep=3)
  assert ckpt.latest_step() == 2
  _, data_state, step = ckpt.restore(sharded.abstract)
  assert (step, data_state) == (2, {"batches": 2})
  ckpt.close()


def test_iterator_resumes_at_the_same_batches():
  config = tiny_config()
  mesh = mesh_lib.create_mesh({"data": -1})
  source = baseline.make_sources(config)[0]
  sharding = baseline.shd.logical_sharding(("batch",), mesh, config.sharding.rules)
  straight = HostBatchIterator(source, 16, sharding, seed=5)
  batches = [straight.next_local() for _ in range(6)]
  resumed = HostBatchIterator(source, 16, sharding, seed=5, start_batch=3)
  for want in batches[3:]:
    got = resumed.next_local()
    np.testing.assert_array_equal(got["image"], want["image"])
  assert resumed.state() == {"batches": 6}
  # Different seeds give different orders; batches differ from one another.
  other = HostBatchIterator(source, 16, sharding, seed=6).next_local()
  assert not np.array_equal(other["image"], batches[0]["image"])
  assert not np.array_equal(batches[0]["image"], batches[1]["image"])



def test_resume_equals_uninterrupted_and_each_step_compiles_once(tmp_path):
  overrides = {"total_steps": 8, "checkpoint.every_steps": 2, "evals.held_out.every_steps": 4,
               "data.num_train": 64, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")

  with CompileCounter() as counter:
    straight = baseline.train(tiny_config(**overrides), straight_dir)
  # One compile of the train step and one of the eval step for the whole run.
  assert counter.names.count("jit(step)") == 1, counter.names
  assert counter.names.count("jit(eval_fn)") == 1, counter.names

  first = baseline.train(tiny_config(stop_at_step=3, **overrides), resumed_dir)
  assert first["last_step"] == 3
  assert Checkpointer(os.path.join(resumed_dir, "checkpoints"), 2, 3).latest_step() == 3
  second = baseline.train(tiny_config(**overrides), resumed_dir)
  assert second["last_step"] == 8

  want = {r["step"]: r["loss"] for r in read_metrics(straight_dir) if "loss" in r}
  got = {r["step"]: r["loss"] for r in read_metrics(resumed_dir) if "loss" in r}
  assert sorted(got) == list(range(1, 9)) == sorted(want)
  np.testing.assert_array_equal([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second["state"].params),
               jax.device_get(straight["state"].params))


def test_compiled_step_refuses_other_shapes_instead_of_recompiling():
  config = tiny_config()
  built = baseline.build(config, mesh_lib.create_mesh({"data": -1}))
  state = built.sharded.init(jax.random.key(0))
  bad = {k: jax.numpy.zeros((config.batch_size // 2,) + v.shape[1:], v.dtype)
         for k, v in built.layout.abstract_batch.items()}
  with pytest.raises((TypeError, ValueError)):
    built.train_step(state, bad)


def test_sigterm_saves_and_exits_cleanly(tmp_path, repo_root):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "nuwa_jax.train", "--config=configs/baseline.py:size=tiny",
         f"--workdir={workdir}", "--config.total_steps=100000", "--config.log_every_steps=1",
         "--config.checkpoint.every_steps=100000", "--config.evals.held_out.every_steps=100000"]
  proc = subprocess.Popen(cmd, cwd=repo_root, env=subprocess_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "pre-empted" in out
  steps = Checkpointer(str(workdir / "checkpoints"), 1, 1).all_steps()
  assert len(steps) == 1 and steps[0] >= 5, steps
  last_logged = max(json.loads(l)["step"] for l in metrics.read_text().splitlines())
  assert steps[0] == last_logged


def test_non_finite_loss_names_the_step(tmp_path):
  from nuwa_jax.runtime.metrics import AsyncMetrics, MetricWriter, NonFiniteLossError
  tracker = AsyncMetrics(MetricWriter(str(tmp_path)), 10, 100, 1)
  tracker.push(1, {"loss": np.float32(1.0)})
  tracker.push(2, {"loss": np.float32(np.nan)})
  with pytest.raises(NonFiniteLossError, match="at step 2"):
    tracker.push(3, {"loss": np.float32(1.0)})
