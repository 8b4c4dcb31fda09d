"""Process-wide XLA settings, applied before jax is first imported (the CLI, the tests, bench's children).

    from busgen_jax import xla_env; xla_env.apply()      # then import jax
    from busgen_jax import xla_env; xla_env.script()     # a script outside the CLI: the same, absl flags parsed

XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK, whose kernel gradients run at about a third of the forward
convolutions' rate inside a training step; with XLA's Eigen convolutions the `cpu` preset's UNet trains 1.3x and
samples 1.8x faster (docs/BENCHMARKS.md, "XLA:CPU convolutions"). YNNPACK keeps the dots. The flag only concerns
XLA:CPU (TPU and GPU compilations ignore it); a user's own setting of it is kept.

XLA:CPU allocates a program's temporaries afresh on every execution (1.6 GB for the official 64 px train step), and
glibc's malloc serves such sizes with a new mmap that it unmaps on free: the kernel then faults in and zeroes
~1,000,000 pages per step. With BUSGEN_JAX_HOST_MEMORY=keep, apply() sets glibc's malloc to one arena, no mmap and
no trimming (keep_host_memory), so freed memory serves the next execution: no page faults per step, and the official
64 px train step 1.16x faster on this project's CPU machine (docs/BENCHMARKS.md, "Host memory"). The cost: a process
keeps its peak heap until it exits (which can grow over the first executions, until freed blocks fit the next ones),
and every thread shares one arena (untried with a TPU host's input pipeline), so it is an option. A MALLOC_*
variable, a glibc.malloc tunable or a preloaded allocator in the environment leaves malloc as the user set it.

By default (BUSGEN_JAX_HOST_MEMORY unset or "hugepages") the CLI asks glibc's malloc for transparent huge pages
(the glibc.malloc.hugetlb=1 tunable, glibc >= 2.35, where the kernel's THP mode is "madvise" or "always"): its large
blocks are madvised, so a fresh 1.6 GB buffer faults in as ~800 2 MiB pages instead of ~400,000 4 KiB ones, while
freed memory still goes back to the system. glibc reads tunables only at start-up, so the CLI re-executes itself
once with the tunable set (reexec_with_hugepages; bench's and sweep's children inherit it). "glibc" leaves malloc as
it comes. docs/BENCHMARKS.md, "Host memory", has the measurements.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings
from typing import Mapping, MutableMapping

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FLAG}=-individual_convolution",)
# glibc's variable -> (its mallopt parameter in <malloc.h>, the value): M_ARENA_MAX, M_MMAP_MAX and M_TRIM_THRESHOLD
# (-1: never trim; the variable takes it as size_t, 2^64 - 1).
MALLOC = {"MALLOC_ARENA_MAX": (-8, 1), "MALLOC_MMAP_MAX_": (-4, 0), "MALLOC_TRIM_THRESHOLD_": (-1, -1)}
MALLOC_ENV = {k: str(value % 2 ** 64) for k, (_, value) in MALLOC.items()}   # the variables' form, for children
HOST_MEMORY = "BUSGEN_JAX_HOST_MEMORY"
HOST_MEMORY_MODES = ("hugepages", "keep", "glibc")      # the first is the default
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def xla_flags(current: str) -> str:
  """`current` (an XLA_FLAGS value) with CPU_FLAGS appended, except a flag the user already set."""
  given = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in CPU_FLAGS if f.split("=", 1)[0] not in given]
  return " ".join([current.strip(), *extra]).strip()


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds CPU_FLAGS to XLA_FLAGS (read once, when jax creates its first backend); in this process's own
  environment with BUSGEN_JAX_HOST_MEMORY=keep, keeps freed host memory (keep_host_memory)."""
  environ["XLA_FLAGS"] = xla_flags(environ.get("XLA_FLAGS", ""))
  how = host_memory(environ)
  if how == "keep" and environ is os.environ and (why := keep_host_memory()):
    warnings.warn(f"{HOST_MEMORY}=keep: {why}; malloc left as it is")


def host_memory(environ: Mapping[str, str]) -> str:
  """BUSGEN_JAX_HOST_MEMORY's value, checked: one of HOST_MEMORY_MODES."""
  how = environ.get(HOST_MEMORY) or HOST_MEMORY_MODES[0]
  if how not in HOST_MEMORY_MODES:
    raise ValueError(f"{HOST_MEMORY}={how!r}: expected one of {', '.join(HOST_MEMORY_MODES)}")
  return how


def thp_mode(path: str = THP_MODE) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None where it has none."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  return text[text.find("[") + 1:text.find("]")] if "[" in text else None


def hugepages_env(environ: Mapping[str, str], thp: str | None = None, libc: tuple[str, str] | None = None
                  ) -> dict[str, str] | None:
  """`environ` with glibc's huge-page tunable added to GLIBC_TUNABLES, or None where nothing is to change: another
  host-memory mode, a user's own malloc settings, no THP (mode "never" or none), or a C library other than
  glibc >= 2.35 (the tunable's first release). thp and libc default to this machine's."""
  if host_memory(environ) != "hugepages" or user_malloc(environ):
    return None
  name, version = libc or platform.libc_ver()
  release = tuple(int(v) for v in version.split(".")[:2] if v.isdigit())
  if name != "glibc" or len(release) < 2 or release < (2, 35):
    return None
  if (thp or thp_mode()) not in ("madvise", "always"):
    return None
  tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), HUGEPAGES_TUNABLE) if t)
  return dict(environ, GLIBC_TUNABLES=tunables)


def reexec_with_hugepages() -> None:
  """Replaces this process with itself (the same interpreter and command line, sys.orig_argv) under hugepages_env,
  where that changes anything; the new process finds the tunable set and goes on. Only a program's entry point
  calls it (the CLI), before any output or thread: nothing of this process survives."""
  env = hugepages_env(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def user_malloc(environ: Mapping[str, str]) -> bool:
  """Whether the environment configures malloc itself (glibc variables or tunables, or a preloaded allocator)."""
  return (any(k.startswith("MALLOC_") for k in environ) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")
          or "malloc" in environ.get("LD_PRELOAD", ""))


def without_malloc_settings(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` less every variable user_malloc would see and BUSGEN_JAX_HOST_MEMORY: where a child process that
  measures the host-memory modes starts from."""
  return {k: v for k, v in environ.items() if not user_malloc({k: v}) and k != HOST_MEMORY}


def keep_host_memory() -> str | None:
  """MALLOC's settings for this process (mallopt) and, through the environment, its children (glibc reads the
  variables at start-up); None once they are in effect, else why not. Call it before jax starts its threads: a
  thread that has already allocated keeps its own arena."""
  if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
    return None                         # a child of a process that set them: glibc read them at start-up
  if user_malloc(os.environ):
    return "the environment sets malloc (MALLOC_*, GLIBC_TUNABLES or LD_PRELOAD)"
  if platform.libc_ver()[0] != "glibc":
    return "the C library is not glibc"
  mallopt = ctypes.CDLL(None).mallopt
  if not all(mallopt(param, value) == 1 for param, value in MALLOC.values()):
    return "glibc's mallopt refused a setting"
  os.environ.update(MALLOC_ENV)
  return None


def script() -> None:
  """The process setup of a script outside the CLI (docs/experiments, test workers): apply(), the CLI's quiet
  imports (no TensorFlow start-up lines on the console), and absl's flags marked parsed, since Grain's worker
  processes read them and only absl.app.run would mark them."""
  apply()
  from busgen_jax import console
  console.quiet_imports()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
