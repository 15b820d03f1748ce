"""Tests for launch/launch.py: dry-run commands for every target, flag errors, real CPU runs."""

import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "launch.py"
USER_ARGS = ["--config=configs/baseline.py:size=tiny", "--workdir=gs://bucket/run1"]

# Stand-in for nuwa_jax.train: prints its distributed flags and environment. The process whose
# id is in $FAKE_FAIL_ID exits 1; the others then hang, as a real run waiting on a dead peer would.
FAKE_ENTRY = textwrap.dedent("""\
    import argparse, os, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    print(f"id={args.process_id} n={args.num_processes} coord={args.coordinator_address} "
          f"workdir={args.workdir} xla={os.environ['XLA_FLAGS']} "
          f"platforms={os.environ['JAX_PLATFORMS']}")
    fail_id = os.environ.get("FAKE_FAIL_ID")
    if fail_id is not None:
      if args.process_id == int(fail_id):
        sys.exit(1)
      time.sleep(60)
    """)


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory, monkeypatch):
  """Puts a failing `gcloud` first on PATH, so no test can reach a real cloud project."""
  stub_dir = tmp_path_factory.mktemp("stub_bin")
  stub = stub_dir / "gcloud"
  stub.write_text("#!/bin/sh\necho 'gcloud must not run in tests' >&2\nexit 97\n")
  stub.chmod(0o755)
  monkeypatch.setenv("PATH", f"{stub_dir}{os.pathsep}{os.environ['PATH']}")


def launch(*argv, env=None, timeout=60):
  """Runs the launcher with argv; returns the CompletedProcess (text output).

  Launcher flags such as --dry_run must come before the `--` that starts the module arguments.
  """
  return subprocess.run([sys.executable, str(LAUNCH), *argv], capture_output=True, text=True,
                        env=env, timeout=timeout)


def dry_run_lines(*argv):
  """Returns the dry-run output of the launcher, each line split like a shell would."""
  result = launch("--dry_run", *argv)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def test_tpu_vm_dry_run_copies_installs_and_runs_on_all_workers(tmp_path):
  requirements = tmp_path / "requirements-lock.txt"
  requirements.write_text("jax==0.4.35\n")
  tar, scp, install, run = dry_run_lines(
      "--target=tpu_vm", "--tpu_name=my-pod", "--zone=us-central2-b", "--project=proj",
      f"--requirements={requirements}", "--", *USER_ARGS)

  assert tar[:2] == ["tar", "czf"] and "--exclude=.git" in tar
  tarball = tar[2]
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball]
  assert str(requirements) in scp and "my-pod:~/" in scp
  for command in (scp, install, run):
    assert "--worker=all" in command
    assert "--zone=us-central2-b" in command and "--project=proj" in command
  for command in (install, run):
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]

  install_script = install[install.index("--command") + 1]
  assert f"tar xzf ~/{os.path.basename(tarball)}" in install_script
  assert install_script.index("pip install -r ~/requirements-lock.txt") < install_script.index(
      "pip install -e '.[tpu]'")

  run_script = run[run.index("--command") + 1]
  assert run_script == ("cd ~/nuwa_jax && ~/nuwa_venv/bin/python -m nuwa_jax.train "
                        + " ".join(USER_ARGS))
  assert "coordinator" not in run_script


def test_tpu_vm_local_workdir_warns():
  result = launch("--target=tpu_vm", "--tpu_name=pod", "--zone=z", "--dry_run", "--",
                  "--workdir=/tmp/w")
  assert result.returncode == 0
  assert "warning" in result.stderr and "gs://" in result.stderr
  quiet = launch("--target=tpu_vm", "--tpu_name=pod", "--zone=z", "--dry_run", "--", *USER_ARGS)
  assert "warning" not in quiet.stderr


def test_tpu_vm_skip_install_only_runs():
  (run,) = dry_run_lines("--target=tpu_vm", "--tpu_name=pod", "--zone=z", "--skip_install",
                         "--module=nuwa_jax.sample", "--", *USER_ARGS)
  assert "--worker=all" in run
  assert run[-1].endswith("-m nuwa_jax.sample " + " ".join(USER_ARGS))


def test_cpu_multiprocess_dry_run_sets_ids_port_and_xla_flags():
  lines = dry_run_lines("--target=cpu_multiprocess", "--num_processes=3",
                        "--devices_per_process=4", "--coordinator_port=23456", "--", *USER_ARGS)
  assert len(lines) == 3
  for i, words in enumerate(lines):
    env = dict(w.split("=", 1) for w in words if not w.startswith("-") and "=" in w)
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].split()[-1] == "--xla_force_host_platform_device_count=4"
    module_argv = words[words.index("-m") + 1:]
    assert module_argv == ["nuwa_jax.train", *USER_ARGS, "--coordinator_address=127.0.0.1:23456",
                           "--num_processes=3", f"--process_id={i}"]


def test_gpu_dry_run_installs_then_runs():
  *install, run = dry_run_lines("--target=gpu", "--venv=/opt/venv", "--", *USER_ARGS)
  assert install[0][-3:] == ["-m", "venv", "/opt/venv"]
  assert install[-1][:3] == ["/opt/venv/bin/pip", "install", "-e"]
  assert install[-1][3].endswith("[cuda]")
  assert run == ["/opt/venv/bin/python", "-m", "nuwa_jax.train", *USER_ARGS]


@pytest.mark.parametrize("argv, flag", [
    (["--target=tpu_vm", "--zone=z"], "--tpu_name"),
    (["--target=tpu_vm", "--tpu_name=pod"], "--zone"),
    (["--target=cpu_multiprocess", "--num_processes=0", "--devices_per_process=1"],
     "--num_processes"),
    (["--target=cpu_multiprocess", "--num_processes=2"], "--devices_per_process"),
    (["--target=cpu_multiprocess", "--num_processes=2", "--devices_per_process=1",
      "--coordinator_port=70000"], "--coordinator_port"),
    (["--target=gpu", "--num_processes=2"], "--num_processes"),
    (["--target=cpu_multiprocess", "--num_processes=1", "--devices_per_process=1",
      "--tpu_name=pod"], "--tpu_name"),
    (["--target=gpu", "--requirements=/does/not/exist.txt"], "--requirements"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag):
  result = launch("--dry_run", *argv)
  assert result.returncode == 2
  assert flag in result.stderr
  assert result.stdout == ""


@pytest.fixture
def fake_entry_env(tmp_path):
  """The environment under which `python -m fake_entry` imports the stand-in entry point."""
  (tmp_path / "fake_entry.py").write_text(FAKE_ENTRY)
  env = dict(os.environ)
  env.pop("FAKE_FAIL_ID", None)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
  return env


def test_cpu_multiprocess_runs_every_process(fake_entry_env):
  result = launch("--target=cpu_multiprocess", "--num_processes=2", "--devices_per_process=2",
                  "--coordinator_port=23457", "--module=fake_entry", "--",
                  "--workdir=/tmp/w", env=fake_entry_env)
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  # The parent's other XLA flags are kept (e.g. nuwa_jax/runtime/xla_flags.py's), its device
  # count replaced.
  kept = " ".join(f for f in fake_entry_env.get("XLA_FLAGS", "").split()
                  if not f.startswith("--xla_force_host_platform_device_count"))
  xla = " ".join(filter(None, [kept, "--xla_force_host_platform_device_count=2"]))
  for i in range(2):
    expected = (f"[p{i}] id={i} n=2 coord=127.0.0.1:23457 workdir=/tmp/w "
                f"xla={xla} platforms=cpu")
    assert any(line.endswith(expected) for line in lines), result.stdout


def test_cpu_multiprocess_failure_stops_the_others(fake_entry_env):
  fake_entry_env["FAKE_FAIL_ID"] = "1"
  start = time.monotonic()
  result = launch("--target=cpu_multiprocess", "--num_processes=3", "--devices_per_process=1",
                  "--module=fake_entry", env=fake_entry_env)
  assert result.returncode == 1
  assert "process 1 exited with code 1" in result.stderr
  assert "[p1] id=1 n=3" in result.stdout
  # The surviving processes sleep for 60 s unless the launcher terminates them.
  assert time.monotonic() - start < 30
