"""The process-wide XLA settings (busgen_jax/xla_env.py): appended once, a user's own value kept, and in effect
with the pinned jaxlib (conftest applies them, as the CLI does)."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from busgen_jax import xla_env


def test_flags_appended_once_and_user_setting_kept():
  assert xla_env.xla_flags("") == " ".join(xla_env.CPU_FLAGS)
  once = xla_env.xla_flags("--xla_force_host_platform_device_count=8")
  assert once.startswith("--xla_force_host_platform_device_count=8 ") and xla_env.xla_flags(once) == once
  mine = f"{xla_env.YNN_FLAG}="        # the user turns every YNNPACK fusion off: left as given
  assert xla_env.xla_flags(mine) == mine
  env = {"XLA_FLAGS": "--a=1"}
  xla_env.apply(env)
  assert env["XLA_FLAGS"] == "--a=1 " + " ".join(xla_env.CPU_FLAGS)


def test_script_setup_applies_flags_and_marks_absl_parsed():
  flags.FLAGS.unparse_flags()
  try:
    xla_env.script()
    assert flags.FLAGS.is_parsed()
    assert set(xla_env.CPU_FLAGS) <= set(os.environ["XLA_FLAGS"].split())
  finally:
    flags.FLAGS.mark_as_parsed()


def test_a_script_starts_tensorflow_quietly():
  """docs/experiments scripts go through script(): TensorFlow (clu's writers import it) must not print its C++
  start-up lines on their console, as it did before script() took the CLI's quiet imports."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  out = subprocess.run([sys.executable, "-c", "from busgen_jax import xla_env; xla_env.script(); import tensorflow"],
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "oneDNN custom operations" not in out.stderr and "InitializeLog" not in out.stderr, out.stderr[-3000:]


def test_a_script_with_the_console_shows_warnings_and_logs_the_chatter(tmp_path):
  """A docs/experiments script that calls console.setup: library INFO goes to its log file, not to the console,
  even when a library installed logging.basicConfig's console handler first."""
  code = ("import logging; from busgen_jax import console, xla_env; xla_env.script(); logging.basicConfig(); "
          f"console.setup({str(tmp_path)!r}, 'study'); logging.info('chatter'); logging.warning('heads up')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "chatter" not in out.stderr and "heads up" in out.stderr, out.stderr[-3000:]
  log = (tmp_path / "logs" / "study.log").read_text()
  assert "chatter" in log and "heads up" in log


def test_convolutions_leave_ynnpack_and_dots_keep_it():
  """The flag's name and value are ones this jaxlib knows (an unknown value aborts at backend start, an unknown
  name is ignored): a convolution compiles to XLA's own (Eigen) convolution, a dot still to a YNNPACK fusion."""
  # compiled only, never run; large enough that XLA would give it to YNNPACK (small ones never are)
  x, k = jax.ShapeDtypeStruct((4, 64, 64, 128), jnp.float32), jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32)
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))
  hlo = conv.lower(x, k).compile().as_text()
  assert "convolution(" in hlo and "__ynn_fusion" not in hlo, hlo
  m = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  dot = jax.jit(lambda a, b: a @ b).lower(m, m).compile().as_text()
  assert "__ynn_fusion" in dot, dot


_FAULTS_SETUP = """
import resource, statistics, sys
from busgen_jax import xla_env
print(xla_env.keep_host_memory() if sys.argv[1] == "keep" else "glibc")
"""
_FAULTS_BODY = """
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: a @ b)                 # a fresh 64 MiB result per call
a, b = jnp.ones((8192, 64)), jnp.ones((64, 2048))
pages = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, b).block_until_ready()
  pages.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(pages[10:]))   # the heap may grow over the first calls
"""
_FAULTS = _FAULTS_SETUP + _FAULTS_BODY


def test_freed_host_memory_is_reused_without_page_faults():
  """XLA:CPU allocates each execution's buffers afresh: with glibc's defaults a 64 MiB buffer is a new mmap whose
  16,384 pages fault in on every call; with keep_host_memory's settings, set by mallopt or inherited through the
  environment by a child process, the freed buffer serves the next call. Each in a fresh process (malloc is set
  before jax starts its threads)."""
  if platform.libc_ver()[0] != "glibc":
    pytest.skip("glibc's malloc only")
  env = xla_env.without_malloc_settings(os.environ)
  results = {}
  default = {"MALLOC_ARENA_TEST": "8"}         # glibc's own default value: a MALLOC_ variable that changes nothing
  for how, extra in (("keep", {}), ("inherited", xla_env.MALLOC_ENV), ("glibc", default)):
    out = subprocess.run([sys.executable, "-c", _FAULTS, how], env={**env, **extra}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results[how] = out.stdout.split()
  assert results["keep"][0] == "None" and float(results["keep"][1]) < 1000, results
  assert float(results["inherited"][1]) < 1000, results
  assert float(results["glibc"][1]) >= 16384, results


def test_huge_pages_where_glibc_and_the_kernel_have_them():
  base = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"}
  env = xla_env.hugepages_env(base, thp="madvise", libc=("glibc", "2.36"))
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2:" + xla_env.HUGEPAGES_TUNABLE}
  always = xla_env.hugepages_env({}, thp="always", libc=("glibc", "2.35"))
  assert always == {"GLIBC_TUNABLES": xla_env.HUGEPAGES_TUNABLE}
  assert xla_env.hugepages_env({xla_env.HOST_MEMORY: "hugepages"}, thp="madvise", libc=("glibc", "2.40"))
  for environ, thp, libc in (({}, "never", ("glibc", "2.36")),
                             ({}, "madvise", ("glibc", "2.34")), ({}, "madvise", ("", "")),
                             ({}, "madvise", ("glibc", "2.x")),
                             ({xla_env.HOST_MEMORY: "keep"}, "madvise", ("glibc", "2.36")),
                             ({xla_env.HOST_MEMORY: "glibc"}, "madvise", ("glibc", "2.36")),
                             ({"MALLOC_ARENA_MAX": "2"}, "madvise", ("glibc", "2.36")),
                             ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", ("glibc", "2.36"))):
    assert xla_env.hugepages_env(environ, thp=thp, libc=libc) is None, (environ, thp, libc)
  with pytest.raises(ValueError, match="hugepages, keep, glibc"):
    xla_env.hugepages_env({xla_env.HOST_MEMORY: "huge"})


def test_thp_mode(tmp_path):
  (tmp_path / "enabled").write_text("always [madvise] never\n")
  assert xla_env.thp_mode(str(tmp_path / "enabled")) == "madvise"
  assert xla_env.thp_mode(str(tmp_path / "missing")) is None


def test_the_cli_reexecutes_itself_with_huge_pages():
  """glibc reads its tunables at start-up: reexec_with_hugepages replaces the process with itself (the same command
  line, here `python -c CODE MODE`) under the tunable, and a fresh 64 MiB buffer then faults in as huge pages;
  BUSGEN_JAX_HOST_MEMORY=glibc leaves the process as it is."""
  env = xla_env.without_malloc_settings(os.environ)
  if xla_env.hugepages_env(env) is None:
    pytest.skip("no glibc >= 2.35 with transparent huge pages here")
  code = ("import os, resource, statistics; from busgen_jax import xla_env; xla_env.reexec_with_hugepages(); "
          "print(os.environ.get('GLIBC_TUNABLES'))" + _FAULTS_BODY)
  results = {}
  for how in ("hugepages", "glibc"):
    out = subprocess.run([sys.executable, "-c", code, how], env={**env, xla_env.HOST_MEMORY: how},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results[how] = out.stdout.split()
  assert results["hugepages"][0] == xla_env.HUGEPAGES_TUNABLE and float(results["hugepages"][1]) < 1000, results
  assert results["glibc"][0] == "None" and float(results["glibc"][1]) >= 16384, results


def test_host_memory_is_an_option():
  env = {}
  xla_env.apply(env)                               # not this process's environment: nothing to set
  assert not any(k.startswith("MALLOC_") for k in env)
  with pytest.raises(ValueError, match=xla_env.HOST_MEMORY):
    xla_env.apply({xla_env.HOST_MEMORY: "kept"})


def test_a_users_malloc_settings_are_kept_with_a_warning():
  code = "from busgen_jax import xla_env; xla_env.apply()"
  env = dict(os.environ, **{xla_env.HOST_MEMORY: "keep", "MALLOC_ARENA_MAX": "4"})
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "the environment sets malloc" in out.stderr, out.stderr[-3000:]
  inherited = dict(os.environ, **{xla_env.HOST_MEMORY: "keep"}, **xla_env.MALLOC_ENV)
  out = subprocess.run([sys.executable, "-c", code], env=inherited, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "malloc" not in out.stderr, out.stderr[-3000:]    # a child of a keeping process


def test_user_malloc():
  assert not xla_env.user_malloc({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"})
  for env in ({"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
              {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, {"MALLOC_CONF": "background_thread:true"}):
    assert xla_env.user_malloc(env), env
