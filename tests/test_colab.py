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


def test_notebooks_execute_headless(tmp_path, monkeypatch):
  monkeypatch.setenv("BUSGEN_COLAB_WORK", str(tmp_path / "work"))
  monkeypatch.setenv("XLA_FLAGS", "")          # one CPU device in the kernel, as on a Colab CPU runtime
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
