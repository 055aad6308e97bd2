"""The package's import graph: no circle, and nothing imported upwards.

Each module of ddx belongs to one layer of `LAYERS` (docs/architecture.md
draws them); a module may import modules of its own layer or of layers below
it, never above. Read from the source with `ast` (every import, also those
inside functions, which still tie the modules), so the test needs no JAX.
A new module must be given a layer here: an unplaced one fails the test.
"""
import ast
import fnmatch
import pathlib

import pytest

from testutils import ROOT

# Bottom to top. fnmatch patterns over dotted module names; the first match wins.
LAYERS = [
    ("foundations: registries, specs, config, files, devices, data", [
        "ddx", "ddx.processes", "ddx.processes.base", "ddx.processes.*.spec",
        "ddx.models", "ddx.models.spec", "ddx.models.*.spec", "ddx.registry", "ddx.config",
        "ddx.outdir",
        "ddx.workdir", "ddx.weight_files", "ddx.batch_files", "ddx.compile_cache", "ddx.logging",
        "ddx.parallel", "ddx.data"]),
    ("shared numerics: networks, samplers, likelihood, metrics", [
        "ddx.models.*", "ddx.sampling", "ddx.sampling.*", "ddx.likelihood",
        "ddx.evaluation", "ddx.inception", "ddx.autoencoder", "ddx.encoders",
        "ddx.encoders.*"]),
    ("the processes' JAX half", ["ddx.processes.*"]),
    ("the Model face", ["ddx.options", "ddx.model", "ddx.latents", "ddx.checkpoint",
                        "ddx.inversion", "ddx.bpd"]),
    ("runs", ["ddx.state", "ddx.repa", "ddx.posthoc_ema", "ddx.eval_run", "ddx.train"]),
    ("commands", ["ddx.main", "ddx.evaluate", "ddx.convert", "ddx.convert.*"]),
]


def _modules() -> dict:
  root = pathlib.Path(ROOT)
  out = {}
  for path in sorted((root / "ddx").rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set:
  """The ddx modules `name` imports (a `from pkg import mod` counts as mod)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.split(".")[0] == "ddx"}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      if base.split(".")[0] != "ddx":
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        found.add(sub if sub in modules else base)
  return {m for m in found if m in modules and m != name}


def _layer(name: str) -> int:
  # A process's or backbone's folder __init__ goes with its spec: config
  # validation imports both.
  parts = name.split(".")
  if len(parts) == 3 and parts[1] in ("processes", "models") and (
      pathlib.Path(ROOT, *parts, "__init__.py").is_file()):
    return 0
  for i, (_, patterns) in enumerate(LAYERS):
    if any(fnmatch.fnmatchcase(name, p) for p in patterns):
      return i
  return -1


def test_every_module_has_a_layer_and_imports_none_above_it():
  modules = _modules()
  unplaced = [m for m in modules if _layer(m) < 0]
  assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"
  upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
            for m, path in modules.items() for d in sorted(_imports(m, path, modules))
            if _layer(d) > _layer(m)]
  assert not upward, "imports that run upwards:\n" + "\n".join(upward)


def test_no_import_circle():
  modules = _modules()
  graph = {m: _imports(m, p, modules) for m, p in modules.items()}
  # A package imports its own submodules to hand names on; that edge is not a
  # circle when the submodule imports the package's other names only.
  state, stack, circles = {}, [], []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        circles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_sampling_package_imports_no_process():
  modules = _modules()
  for m, p in modules.items():
    if m == "ddx.sampling" or m.startswith("ddx.sampling."):
      assert all(d.startswith("ddx.sampling") for d in _imports(m, p, modules)), m


@pytest.mark.parametrize("kind", ["processes", "models"])
def test_a_variant_folder_spec_and_init_are_plain_python(kind):
  """Validating a config imports each registered process's and backbone's folder
  __init__ and spec: they import nothing but the registry's base module and other
  specs (tests/test_config.py checks, in a fresh interpreter, that no JAX comes in)."""
  modules = _modules()
  base = {"processes": "ddx.processes.base", "models": "ddx.models.spec"}[kind]
  for m, p in modules.items():
    if fnmatch.fnmatchcase(m, f"ddx.{kind}.*.spec") or (
        m.count(".") == 2 and m.startswith(f"ddx.{kind}.") and p.name == "__init__.py"):
      for d in _imports(m, p, modules):
        assert d in (base, f"ddx.{kind}", "ddx.registry") or d.endswith(".spec"), (m, d)
