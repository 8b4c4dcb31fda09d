"""Security scan of the package's source: nothing unpickles (no pickle-family imports, no
np.load(allow_pickle=True), torch.load only with weights_only=True), no eval/exec, no unsafe YAML, no shell=True.
The scanner is checked on planted snippets first, so a pass means something."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "busgen_jax"
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib", "jsonpickle"}


def _name(node) -> str:
  """Dotted name of a call's function: np.load, torch.load, eval, ..."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f"{_name(node.value)}.{node.attr}"
  return ""


def _kw(call: ast.Call, name: str):
  for k in call.keywords:
    if k.arg == name:
      return k.value.value if isinstance(k.value, ast.Constant) else "non-constant"
  return None


def findings(source: str, filename: str = "<string>") -> list[str]:
  out = []
  for node in ast.walk(ast.parse(source, filename)):
    where = f"{filename}:{getattr(node, 'lineno', 0)}"
    if isinstance(node, ast.Import):
      out += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNPICKLERS:
      out.append(f"{where}: imports from {node.module}")
    elif isinstance(node, ast.Call):
      f = _name(node.func)
      last = f.rsplit(".", 1)[-1]
      if f in ("eval", "exec"):
        out.append(f"{where}: {f}()")
      elif last == "load" and f.split(".")[0] in ("np", "numpy", "jnp") and _kw(node, "allow_pickle") not in (None, False):
        out.append(f"{where}: {f}(allow_pickle=...)")
      elif f.endswith("torch.load") and _kw(node, "weights_only") is not True:
        out.append(f"{where}: torch.load without weights_only=True")
      elif f in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
        out.append(f"{where}: {f} (use yaml.safe_load)")
      elif _kw(node, "shell") not in (None, False):
        out.append(f"{where}: shell=True")
      elif last == "extractall":
        out.append(f"{where}: archive extractall (paths can escape)")
  return out


@pytest.mark.parametrize("snippet", [
    "import pickle", "from cloudpickle import loads", "import dill as d", "np.load(f, allow_pickle=True)",
    "torch.load(path)", "torch.load(path, weights_only=False)", "eval(text)", "yaml.load(s)",
    "subprocess.run(cmd, shell=True)", "tar.extractall(out)"])
def test_the_scanner_catches_each_kind(snippet):
  assert findings(snippet), snippet


def test_the_scanner_allows_the_safe_forms():
  assert not findings("np.load(f)\nnp.load(f, allow_pickle=False)\ntorch.load(p, weights_only=True, map_location='cpu')"
                      "\nyaml.safe_load(s)\nsubprocess.run(['ls'])\njson.loads(s)")


def test_the_package_never_unpickles():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 30
  bad = [f for path in files for f in findings(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
  assert not bad, "\n".join(bad)
  # The official-checkpoint importer is the one place that reads a PyTorch file: with weights_only=True.
  assert "weights_only=True" in (PACKAGE / "official.py").read_text()
