"""The package's folders are its layers: imports point one way, and none loop.

Reads every module's imports with `ast`, those at the top and those inside
functions alike (a deferred import still closes a cycle, it only hides it
until the function runs), and checks them against the layer order of
issue #15, lowest first:

  core (errors, config, storage, run_logging, partitioning) -> model -> checkpoints
  -> data -> tasks -> evaluation -> training -> planning -> cli

A module may import its own layer and the ones before it. `tasks/` (installed
as `switch_jax.tasks`) sits with the data: it registers seqio tasks built from
`switch_jax.data`, which therefore must not import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "model", "checkpoints", "data", "tasks", "evaluation", "training",
          "planning", "cli")
CORE = ("switch_jax", "switch_jax.errors", "switch_jax.config", "switch_jax.storage",
        "switch_jax.run_logging", "switch_jax.partitioning")


def _modules() -> dict[str, Path]:
  """{dotted name: file} for switch_jax/ and tasks/ (as switch_jax.tasks)."""
  modules = {}
  for folder, package in ((ROOT / "switch_jax", "switch_jax"), (ROOT / "tasks", "switch_jax.tasks")):
    for path in folder.rglob("*.py"):
      parts = [package, *path.relative_to(folder).with_suffix("").parts]
      modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


MODULES = _modules()


def _known(name: str):
  """The longest prefix of `name` that is one of our modules (None: a third party's)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str) -> set[str]:
  """Our modules that `module` imports anywhere in its body, with the packages
  Python initializes on the way (`import a.b.c` runs a/ and a/b/ too)."""
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the package, up level - 1 packages
        anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
      names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    else:
      continue
    for name in names:
      target = _known(name)
      while target:
        # A module's own packages are already initialized when it runs.
        if target != module and not module.startswith(target + "."):
          found.add(target)
        target = target.rpartition(".")[0]
  return found


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> str:
  if module in CORE:
    return "core"
  if module == "switch_jax.tasks" or module.startswith("switch_jax.tasks."):
    return "tasks"
  layer = module.split(".")[1]
  assert layer in LAYERS, f"{module}: in no layer; add its folder to LAYERS in order"
  return layer


def test_every_module_is_in_a_layer():
  assert len(MODULES) > 40  # the walk found the package, not an empty folder
  for module in MODULES:
    _layer(module)


def test_no_import_cycle():
  """Depth-first search for a back edge; the message spells the loop out."""
  state, path = {}, []

  def visit(module):
    state[module] = "open"
    path.append(module)
    for target in sorted(GRAPH[module]):
      if state.get(target) == "open":
        loop = path[path.index(target):] + [target]
        pytest.fail("import cycle: " + " -> ".join(loop))
      if target not in state:
        visit(target)
    path.pop()
    state[module] = "done"

  for module in sorted(GRAPH):
    if module not in state:
      visit(module)


def _upward() -> set[tuple[str, str]]:
  return {(module, target) for module, targets in GRAPH.items() for target in targets
          if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module))}


def test_each_layer_imports_only_the_layers_before_it():
  upward = sorted(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
                  for module, target in _upward())
  assert not upward, "imports against the layer order:\n  " + "\n  ".join(upward)


def test_the_check_sees_deferred_imports():
  """The loop this test was written for hid in a function body (data.pipeline
  imported switch_jax.tasks, which imports switch_jax.data); the walk must read
  function bodies, or the tests above prove nothing."""
  source = "def f():\n  from switch_jax.data import pipeline\n"
  nested = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
  assert [n.module for n in nested] == ["switch_jax.data"]
  assert "switch_jax.data.pipeline" in GRAPH["switch_jax.training.trainer"]
  assert "switch_jax.cli.gin_config" in GRAPH["switch_jax.cli.commands.gin_flags"]  # deferred
