"""Paths that may be local or in the cloud (gs://...): run directories, checkpoints, reports.

Checkpoints (Orbax: etils.epath and tensorstore), TensorBoard events (staged locally and copied,
train/writers.BucketMirror), reports, figures, model cards and logs go through etils.epath, so
`--workdir gs://bucket/runs/x` works on a TPU VM. Dataset shards do not: ArrayRecord 0.8.6 opens local files
only, so buckets holding datasets are mounted with gcsfuse (`launch/tpu.sh mount`), and a stage that writes or
reads shards refuses a gs:// dataset path before any work (`local`).

Tests point all of it at a GCS emulator on 127.0.0.1 (tests/test_gcs.py): STORAGE_EMULATOR_HOST for epath's
gcsfs backend (EPATH_USE_TF=false), TENSORSTORE_GCS_HTTP_URL for Orbax's array data.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(p) -> bool:
  return "://" in os.fspath(p)


def path(p) -> epath.Path:
  """A cloud URI as is, or a local path made absolute (with ~ expanded), as an epath.Path."""
  s = os.fspath(p)
  return epath.Path(s) if is_remote(s) else epath.Path(os.path.abspath(os.path.expanduser(s)))


def local(p, what: str = "dataset"):
  """`p` as a local pathlib path, or a clear error for a cloud URI (ArrayRecord reads local files only)."""
  from pathlib import Path
  if is_remote(p):
    raise ValueError(f"{p}: a {what} must be on a local or mounted file system (ArrayRecord reads local files "
                     f"only); mount the bucket on every host with gcsfuse (`bash launch/tpu.sh mount --bucket "
                     f"BUCKET` mounts it at /gcs/BUCKET) and pass that path")
  return Path(p).expanduser()
