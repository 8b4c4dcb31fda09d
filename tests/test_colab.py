"""Every notebook in colab/ runs headless (nbclient) in its tiny CPU setting, in order, without an error.

The kernel is this interpreter's (ipykernel); it sees one CPU device, as a Colab CPU runtime does. Notebooks 2
and 3 train the preset's small model themselves when no checkpoint is given; run in order they share WORK, so
the third resumes the second's finished training instead of repeating it."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "colab").glob("*.ipynb"))


def test_there_are_the_three_notebooks():
  assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03"]
  for p in NOTEBOOKS:
    nb = nbformat.read(p, as_version=4)
    first = nb.cells[1].source
    assert "pip" in first and "find_spec(\"busgen_jax\")" in first, f"{p.name}: the first code cell installs"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{p.name}: committed with outputs"
    assert "git+https://github.com/busgen-jax" not in first, f"{p.name}: a fictional default source"
    second = nb.cells[2].source
    assert 0 <= second.find("xla_env.apply()") < second.find("import jax"), f"{p.name}: XLA settings after jax"
    stray = [c.source[:20] for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("md#")]
    assert not stray, f"{p.name}: stray markdown prefixes {stray}"


# ~90 s: `pytest -m slow tests/test_colab.py`. CI runs the install cell (below) and checks the notebooks' form.
@pytest.mark.slow
def test_notebooks_execute_headless(tmp_path, monkeypatch):
  monkeypatch.setenv("BUSGEN_COLAB_WORK", str(tmp_path / "work"))
  # One CPU device in the kernel, as on a Colab CPU runtime (LLVM at -O0 as in conftest).
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
      client.execute()
    except nbclient.exceptions.CellExecutionError as e:   # names the notebook and shows the cell's traceback
      pytest.fail(f"{path.name}: {e}")
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if path.name.startswith("03"):
      assert outputs.count("AUC") >= 3, outputs[-2000:]
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 2, f"{path.name}: expected figures in the outputs"


def test_install_cell_installs_from_the_named_source_and_refuses_none(tmp_path):
  """The install cell as Colab runs it, where busgen_jax is not importable (`python -S`, run outside the checkout):
  without BUSGEN_SOURCE it stops with a message naming it; with the checkout's path it installs the package
  (into a target folder: no dependencies, no build isolation, this venv untouched)."""
  import os
  import subprocess
  import sys
  import pip
  cell = nbformat.read(NOTEBOOKS[0], as_version=4).cells[1].source
  site = str(Path(pip.__file__).resolve().parents[1])   # pip, setuptools: no editable busgen_jax without site
  code = f"import sys; sys.path.append({site!r})\n" + cell
  env = {k: v for k, v in os.environ.items() if not k.startswith(("BUSGEN", "PIP_"))}
  r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert r.returncode != 0 and "set BUSGEN_SOURCE" in r.stderr, r.stderr[-2000:]
  target = tmp_path / "site"
  env.update(BUSGEN_SOURCE=str(NOTEBOOKS[0].parents[1]), PIP_TARGET=str(target), PIP_NO_DEPS="1",
             PIP_NO_BUILD_ISOLATION="0", PIP_NO_INDEX="1")   # pip reads "0" as --no-build-isolation
  r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (target / "busgen_jax" / "cli.py").is_file() and list(target.glob("busgen_jax-*.dist-info"))
