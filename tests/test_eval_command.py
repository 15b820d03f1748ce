"""`python -m nuwa_jax.eval`: every checkpoint once (a rerun evaluates nothing), continuous
evaluation that picks up a later checkpoint and stops when training finishes, rows that carry
their protocol, and bad flags refused with one line before anything is compiled."""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np

from configs import baseline as baseline_config
from nuwa_jax import eval as eval_lib
from nuwa_jax.runtime import mesh as mesh_lib
from nuwa_jax.runtime.checkpoint import mark_finished
from nuwa_jax.trainers import baseline

from conftest import REPO, save_untrained, subprocess_env


def _run_dir(tmp_path, steps=(1, 2)):
  config = baseline_config.get_config("size=tiny")
  mesh = mesh_lib.create_mesh({"data": -1}, jax.devices()[:1])
  layout = baseline.make_layout(config, mesh)
  workdir = str(tmp_path / "run")
  for step in steps:
    save_untrained(layout, config, workdir, step)
  return config, layout, workdir


def _eval_config(num_batches=1):
  c = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict({"held_out": dict(type="token_loss",
                                                         num_batches=num_batches)})
  return c


def _rows(out):
  with open(os.path.join(out, eval_lib.RESULTS)) as f:
    return [json.loads(line) for line in f]


def test_all_checkpoints_once_and_a_rerun_evaluates_nothing(tmp_path):
  _, _, workdir = _run_dir(tmp_path)
  out = str(tmp_path / "eval")
  assert eval_lib.run(workdir, "all", _eval_config(), out) == [1, 2]
  rows = _rows(out)
  assert [(r["step"], r["eval"]) for r in rows] == [(1, "held_out"), (2, "held_out")]
  for r in rows:
    assert r["values"] and all(np.isfinite(v) for v in r["values"].values()), r
    assert r["protocol"]["settings"] == {"type": "token_loss", "num_batches": 1}
    assert r["protocol"]["step"] == r["step"]
  assert eval_lib.run(workdir, "all", _eval_config(), out) == []
  assert len(_rows(out)) == 2
  # One named checkpoint, by step or folder.
  assert eval_lib.chosen_steps(workdir, "1") == [1]
  assert eval_lib.chosen_steps(workdir, os.path.join(workdir, "checkpoints", "2")) == [2]
  assert eval_lib.chosen_steps(workdir, "latest") == [2]


def test_continuous_picks_up_a_new_checkpoint_and_stops_when_training_ends(tmp_path):
  config, layout, workdir = _run_dir(tmp_path, steps=(1,))
  out = str(tmp_path / "eval")
  result = {}

  def evaluate():
    result["steps"] = eval_lib.run(workdir, "continuous", _eval_config(), out, timeout=120,
                                   poll=0.2)
  thread = threading.Thread(target=evaluate)
  thread.start()
  deadline = time.time() + 120
  while not os.path.exists(os.path.join(out, eval_lib.RESULTS)) and time.time() < deadline:
    time.sleep(0.2)
  save_untrained(layout, config, workdir, 3)  # written after the evaluation started
  mark_finished(workdir, 3)
  thread.join(timeout=180)
  assert not thread.is_alive()
  assert result["steps"] == [1, 3]
  assert [r["step"] for r in _rows(out)] == [1, 3]


def test_bad_flags_are_one_line_errors(tmp_path):
  _, _, workdir = _run_dir(tmp_path, steps=(1,))
  cases = [([f"--workdir={tmp_path / 'nothing'}"], "no config.json"),
           ([f"--workdir={workdir}", "--checkpoint=7"], "no finished checkpoint of step 7"),
           ([f"--workdir={workdir}", "--checkpoint=best"], "expected latest, all, continuous"),
           ([f"--workdir={workdir}", "--config=configs/eval/baseline.py",
             "--config.evals.held_out.type=nosuch"], "config.evals.held_out.type='nosuch'")]
  for args, message in cases:
    r = subprocess.run([sys.executable, "-m", "nuwa_jax.eval", *args], cwd=REPO,
                       env=subprocess_env(devices=1), capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert message in r.stderr, (message, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
