"""What the console shows: one line per stage with its time, a progress bar with ETA on long loops, warnings and
errors. Library INFO records (Orbax, CLU, absl, our own detail) go to a log file in the run directory;
`--verbosity=0` (or -v 0) brings them back to the console.

The CLI calls `setup` once; library users and tests who never call it keep Python logging as it was and see no
bars.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time

import tqdm

# Library warnings that tell a user nothing they can act on: dropped (quiet_imports), console and log file alike.
NOISE = (
    "Type handler registry type",                         # Orbax registering jax.Array at import
    "was found in the checkpoint, but could not be restored",   # Orbax: the metadata items we do not restore
    "OpenCV is not installed",                            # TFDS image decoding
)

_enabled = False
_pending_copy: tuple[str, str, str] | None = None   # (local log, gs:// run directory, stage) for `finish`


class _Quiet(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in NOISE)


class _Lines:
  """A redirected stderr for tqdm: each refresh its own line (no carriage returns in log files)."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, s: str) -> None:
    s = s.replace("\r", "").rstrip("\n")
    if s.strip():
      self.stream.write(s + "\n")

  def flush(self) -> None:
    self.stream.flush()


def quiet_imports() -> None:
  """Before the stage's imports: drop NOISE records and TensorFlow's C++ start-up lines (clu's writers import
  TensorFlow; busgen-jax never runs its oneDNN kernels)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  logging.getLogger("absl").addFilter(_Quiet())


def setup(workdir: str | None, stage: str, verbose: bool = False) -> str:
  """Routes logging for a CLI run: the console gets WARNING and above (everything with `verbose`), the log file
  everything from INFO. The file is <workdir>/logs/<stage>.log for a local workdir, else a local temporary file
  (Python's logging writes local files) that `finish` copies into the gs:// run directory. Returns its path."""
  global _enabled, _pending_copy
  from absl import logging as absl_logging
  from busgen_jax import paths
  remote = workdir and paths.is_remote(workdir)
  if workdir and not remote:
    folder = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "logs")
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, f"{stage}.log")
  else:
    fd, log_path = tempfile.mkstemp(prefix=f"busgen_jax_{stage}_", suffix=".log")
    os.close(fd)
  absl_logging.set_verbosity(absl_logging.INFO)
  root = logging.getLogger()
  # A console handler from someone's logging.basicConfig() (a library, in scripts outside absl.app.run) would
  # print every INFO record: the absl handler below is the console's only one.
  for h in list(root.handlers):
    if type(h) is logging.StreamHandler:
      root.removeHandler(h)
  handler = absl_logging.get_absl_handler()
  if handler not in root.handlers:
    root.addHandler(handler)
  if not verbose:
    handler.setLevel(logging.WARNING)
  to_file = logging.FileHandler(log_path)
  to_file.setLevel(logging.INFO)
  to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  root.addHandler(to_file)
  root.setLevel(logging.INFO)
  _pending_copy = (log_path, workdir, stage) if remote else None
  _enabled = not verbose
  return log_path


def finish() -> None:
  """The end of a CLI run (the CLI calls it in a `finally`): a gs:// run directory gets its copy of the log file.
  Not at exit: by then the cloud file systems have closed their sessions."""
  global _pending_copy
  if _pending_copy is None:
    return
  (log_path, workdir, stage), _pending_copy = _pending_copy, None
  from busgen_jax import paths
  for h in logging.getLogger().handlers:
    h.flush()
  try:
    out = paths.path(workdir) / "logs"
    out.mkdir(parents=True, exist_ok=True)
    with open(log_path) as f:
      (out / f"{stage}.log").write_text(f.read())
    os.remove(log_path)
  except Exception as e:  # noqa: BLE001  (the end of a run: say so, never raise over the run's own error)
    print(f"busgen-jax: could not copy the log {log_path} to {workdir}/logs: {e}", file=sys.stderr)


def enabled() -> bool:
  """True in a CLI run on the first process: bars and stage lines are shown."""
  if not _enabled:
    return False
  try:
    import jax
    return jax.process_index() == 0
  except Exception:  # noqa: BLE001  (before or without JAX: a single process)
    return True


def bar(total: int, desc: str, unit: str = "step", initial: int = 0) -> tqdm.tqdm:
  """A progress bar with rate and ETA (disabled, and free, outside CLI runs). Redirected output (a log file, CI)
  gets a line every 30 s instead of in-place updates."""
  tty = sys.stderr.isatty()
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled(),
                   file=sys.stderr if tty else _Lines(sys.stderr),
                   mininterval=0.5 if tty else 30.0, dynamic_ncols=True, leave=True, ascii=not tty,
                   bar_format=None if tty else "{desc}: {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}, {rate_fmt}]")


def line(text: str) -> None:
  """One console line (shown only when bars are: a CLI run, first process)."""
  if enabled():
    tqdm.tqdm.write(text, file=sys.stderr)


@contextlib.contextmanager
def stage(name: str):
  """`name ...` then `name done in 12 s` (or `name failed after 12 s`)."""
  t = time.time()
  line(f"{name} ...")
  try:
    yield
  except BaseException:
    line(f"{name} failed after {time.time() - t:.0f} s")
    raise
  line(f"{name} done in {time.time() - t:.0f} s")
