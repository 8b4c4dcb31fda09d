"""CLU metric writers (TensorBoard + log), progress/ETA, and image grids."""

from __future__ import annotations

import os
import resource

import numpy as np
from clu import metric_writers, periodic_actions


def host_rss_gib() -> float:
  """This process's resident host memory now (Linux /proc), else its peak: logged so leaks show in the curves."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
  except (OSError, ValueError, IndexError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def create(workdir: str, num_steps: int, *, process_index: int, every_steps: int):
  """(writer, progress action). Only process 0 writes summaries; every process logs."""
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
