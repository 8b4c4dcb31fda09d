"""The package's imports point down the layers of ../shared/DESIGN.md and form no cycle.

An AST scan of every module, function-level imports included (they are how a layer violation hides).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "busgen_jax"

# Bottom to top: a module may import modules of its own layer and of the layers below it, never above.
LAYERS = (
    ("base", ("paths", "parallel", "checkpoint", "config_files", "console", "xla_env")),   # paths, meshes, Orbax,
                                                     # configs, console, process-wide XLA flags
    ("data", ("data",)),                                 # schema, sources, the writer, the reader, pipeline
    ("models", ("models",)),                             # UNet, LoRA, classifiers, the model card + loader
    ("diffusion", ("diffusion", "sampling")),            # math only: schedules, objectives, samplers
    ("train", ("train",)),                               # the loops
    ("generate", ("generate", "official")),              # sharded sampling into datasets; official parity
    ("evaluate", ("evaluate",)),                         # metrics, distances, audit, reports
    ("stages", ("stages", "cli")),                       # one file per stage (busgen_jax/stages/), the CLI table
)
# Same-rank peers and explicit bans beside the ordering: data and models never import each other; the math
# layer reads no files (no data, paths or checkpoints).
FORBIDDEN = {("data", "models"), ("models", "data"), ("diffusion", "data"), ("diffusion", "base")}
ALLOWED_BASE_FOR_DIFFUSION = ("parallel",)   # meshes are not files


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: pathlib.Path) -> ast.Module:
  """ast.parse, retried: CPython 3.11 keeps one AST recursion counter per interpreter, so a parse that overlaps
  one on another thread (left running by an earlier test in this worker) fails with "AST constructor recursion
  depth mismatch" (gh-106905) although the file is fine."""
  for _ in range(4):
    try:
      return ast.parse(path.read_text(), str(path))
    except SystemError:
      pass
  return ast.parse(path.read_text(), str(path))


def imports(path: pathlib.Path) -> set[str]:
  """busgen_jax modules a file imports anywhere in it (a `from pkg import mod` names the module)."""
  mod = module_name(path)
  package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
  out = set()
  for node in ast.walk(parse(path)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("busgen_jax")}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(up + ([node.module] if node.module else []))
      if not base.startswith("busgen_jax"):
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        is_module = (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() or \
            (ROOT.parent / sub.replace(".", "/")).is_dir()
        out.add(sub if is_module else base)
  out.discard(mod)
  return out


def layer_of(module: str) -> tuple[int, str]:
  top = module.split(".")[1] if module.count(".") else ""
  for rank, (name, members) in enumerate(LAYERS):
    if top.removesuffix(".py") in members:
      return rank, name
  raise KeyError(module)


def graph() -> dict[str, set[str]]:
  files = [p for p in ROOT.rglob("*.py")]
  return {module_name(p): imports(p) for p in files}


def test_every_module_has_a_layer():
  missing = sorted(m for m in graph() if m != "busgen_jax" and not _has_layer(m))
  assert not missing, f"modules outside every layer of tests/test_architecture.py LAYERS: {missing}"


def _has_layer(m: str) -> bool:
  try:
    layer_of(m)
    return True
  except KeyError:
    return False


def violations(g: dict[str, set[str]]) -> list[str]:
  out = []
  for src, targets in sorted(g.items()):
    if src == "busgen_jax":
      continue
    rs, ls = layer_of(src)
    for dst in sorted(targets):
      if dst == "busgen_jax":
        out.append(f"{src} imports the package root")
        continue
      rd, ld = layer_of(dst)
      if ls == "diffusion" and ld == "base" and dst.split(".")[1] in ALLOWED_BASE_FOR_DIFFUSION:
        continue
      if rd > rs or (ls, ld) in FORBIDDEN:
        out.append(f"{src} ({ls}) -> {dst} ({ld})")
  return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in g.get(v, ()):
      if w not in g:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def test_imports_point_down_the_layers():
  bad = violations(graph())
  assert not bad, "imports against the layers (see ../shared/DESIGN.md):\n" + "\n".join(bad)


def test_no_import_cycles():
  assert not cycles(graph())


def test_the_scan_catches_what_it_must():
  """The checks fail on a planted upward import, a function-level one, a relative one and a cycle."""
  g = graph()
  planted = {**g, "busgen_jax.models.card": g["busgen_jax.models.card"] | {"busgen_jax.train.adapt"}}
  assert violations(planted) == ["busgen_jax.models.card (models) -> busgen_jax.train.adapt (train)"]
  assert violations({**g, "busgen_jax.data.reader": {"busgen_jax.models.unet"}})       # peers
  assert violations({**g, "busgen_jax.diffusion.samplers": {"busgen_jax.paths"}})      # math reads no files
  ring = {**g, "busgen_jax.data.reader": g["busgen_jax.data.reader"] | {"busgen_jax.data.pipeline"}}
  assert ["busgen_jax.data.pipeline", "busgen_jax.data.reader"] in cycles(ring)


def test_function_level_and_relative_imports_are_seen(tmp_path):
  pkg = tmp_path / "busgen_jax" / "models"
  pkg.mkdir(parents=True)
  f = pkg / "x.py"
  f.write_text("def f():\n  from busgen_jax.train import adapt\n  from ..data import reader\n  import busgen_jax.paths\n")
  global ROOT
  old, ROOT = ROOT, tmp_path / "busgen_jax"
  try:
    for d in ("train", "data"):
      (ROOT / d).mkdir()
    (ROOT / "train" / "adapt.py").write_text("")
    (ROOT / "data" / "reader.py").write_text("")
    (ROOT / "paths.py").write_text("")
    assert imports(f) == {"busgen_jax.train.adapt", "busgen_jax.data.reader", "busgen_jax.paths"}
  finally:
    ROOT = old


@pytest.mark.parametrize("limit", [550])
def test_no_module_is_a_grab_bag(limit):
  """Small flat modules: none over `limit` lines (the issue's ~500, with a margin for docstrings)."""
  big = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > limit}
  assert not big, f"modules over {limit} lines: {big}"


def test_every_stage_lives_in_a_file_of_its_name():
  """The CLI is a table of stage -> busgen_jax/stages/<stage>.py, and every such module has the interface."""
  import importlib
  from busgen_jax import cli
  for name, (module, _) in cli.STAGES.items():
    assert module == name.replace("-", "_"), name
    mod = importlib.import_module(f"busgen_jax.stages.{module}")
    assert callable(mod.main), name
    assert getattr(mod, "NO_CONFIG", False) or callable(mod.default_config), name
  on_disk = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
  assert on_disk - {m for m, _ in cli.STAGES.values()} == {"fewshot"}   # the experiment stage's few-shot arm
