"""CLU metric writers (TensorBoard + log), progress/ETA, and image grids."""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
import weakref

import numpy as np

from busgen_jax import paths


def host_rss_gib() -> float:
  """This process's resident host memory now (Linux /proc), else its peak: logged so leaks show in the curves."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
  except (OSError, ValueError, IndexError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class BucketMirror:
  """A clu MetricWriter in all but its base class (clu is imported lazily, see `create`): the default writer on a
  local staging folder whose event files are copied into a cloud run directory (gs://...) through the path layer
  at most every `every_s` seconds, on flush and on close.

  TensorFlow's own GCS client, which tf.summary would use for gs://, re-uploads the whole event file on every
  flush too, so this costs the same; it keeps every bucket write on one client (etils.epath), the one a test can
  point at a local GCS emulator."""

  def __init__(self, remote: str, *, every_s: float = 60.0):
    from clu import metric_writers
    self._local = tempfile.mkdtemp(prefix="busgen_events_")
    weakref.finalize(self, shutil.rmtree, self._local, True)
    self._inner = metric_writers.create_default_writer(self._local, asynchronous=True)
    self._remote, self._every_s = paths.path(remote), every_s
    self._sizes: dict[str, int] = {}
    self._synced = time.monotonic()

  def _sync(self) -> None:
    for root, _, files in os.walk(self._local):
      for name in files:
        src = os.path.join(root, name)
        size = os.path.getsize(src)
        if self._sizes.get(src) != size:
          dst = self._remote / os.path.relpath(src, self._local)
          dst.parent.mkdir(parents=True, exist_ok=True)
          with open(src, "rb") as f:
            dst.write_bytes(f.read())
          self._sizes[src] = size
    self._synced = time.monotonic()

  def _wrote(self) -> None:
    if time.monotonic() - self._synced > self._every_s:
      self.flush()

  def write_summaries(self, step, values, metadata=None):
    self._inner.write_summaries(step, values, metadata)
    self._wrote()

  def write_scalars(self, step, scalars):
    self._inner.write_scalars(step, scalars)
    self._wrote()

  def write_images(self, step, images):
    self._inner.write_images(step, images)
    self._wrote()

  def write_videos(self, step, videos):
    self._inner.write_videos(step, videos)
    self._wrote()

  def write_audios(self, step, audios, *, sample_rate):
    self._inner.write_audios(step, audios, sample_rate=sample_rate)
    self._wrote()

  def write_texts(self, step, texts):
    self._inner.write_texts(step, texts)
    self._wrote()

  def write_histograms(self, step, arrays, num_buckets=None):
    self._inner.write_histograms(step, arrays, num_buckets)
    self._wrote()

  def write_hparams(self, hparams):
    self._inner.write_hparams(hparams)
    self._wrote()

  def flush(self):
    self._inner.flush()
    self._sync()

  def close(self):
    self._inner.close()
    self._sync()


def create(workdir: str, num_steps: int, *, process_index: int, every_steps: int):
  """(writer, progress action). Only process 0 writes summaries; every process logs.

  clu is imported here, not at module level: its summary writer imports TensorFlow (~5 s), which a process that
  trains nothing (a CLI that only evaluates, reuses finished stages or fails on bad input) should not pay."""
  from clu import metric_writers, periodic_actions
  if process_index == 0 and paths.is_remote(workdir):
    writer = BucketMirror(workdir)
  else:
    writer = metric_writers.create_default_writer(workdir, just_logging=process_index > 0, asynchronous=True)
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_steps=every_steps)
  return writer, progress


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> one (1, rows*H, cols*W, C) uint8 grid for image summaries."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  out = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    out[r * h:(r + 1) * h, q * w:(q + 1) * w] = np.clip((im + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  return out[None]
