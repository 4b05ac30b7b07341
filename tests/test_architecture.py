"""The layout rules of jaxcls/ (docs/ARCHITECTURE.md): no import cycle, one owner of the run
directory, command lines that lean on library modules only, modules a newcomer can read."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxcls"
# The command-line modules: each imports library modules only.
COMMANDS = ("jaxcls.main", "jaxcls.evaluate", "jaxcls.predict", "jaxcls.report",
            "jaxcls.data.convert", "jaxcls.data.export_images")
# File and folder names of the run directory: spelled in jaxcls/workdir.py only. Files are
# found inside any string; folders, whose names are common words, as a whole string or as
# the start of one ("checkpoints/...", "damaged_checkpoint_...").
RUN_DIR_FILES = ("config.json", "classes.json", "metrics.jsonl", "results.json",
                 "skipped_examples.json", "summary.md", "model.json")
RUN_DIR_FOLDERS = ("tensorboard", "checkpoints", "damaged_checkpoint_", "export", "report",
                   "variables")


def module_files() -> dict[str, pathlib.Path]:
  files = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    files[name] = path
  return files


def imports_of(name: str, path: pathlib.Path, known) -> set[str]:
  """Every jaxcls module `name` imports, at module level or inside functions, with the
  packages whose __init__ runs on the way."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                 else node.module for alias in node.names]
    for target in targets:
      parts = target.split(".")
      for i in range(2, len(parts) + 1):  # jaxcls.data.pipeline also runs jaxcls/data/__init__
        module = ".".join(parts[:i])
        if module in known and module != name and not name.startswith(module + "."):
          found.add(module)
  return found


def import_graph() -> dict[str, set[str]]:
  files = module_files()
  return {name: imports_of(name, path, files) for name, path in files.items()}


def test_no_import_cycle():
  graph = import_graph()
  done, active, cycles = set(), [], []

  def visit(module):
    if module in active:
      cycles.append(active[active.index(module):] + [module])
      return
    if module in done:
      return
    active.append(module)
    for dep in sorted(graph[module]):
      visit(dep)
    active.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_command_lines_import_library_modules_only():
  """No command leans on another, and only training's own command (main) runs jaxcls.train:
  evaluate and predict build what they need through jaxcls.build."""
  graph = import_graph()
  allowed = {"jaxcls.main": {"jaxcls.train"}}
  for command in COMMANDS:
    leaning = graph[command] & (set(COMMANDS) | {"jaxcls.train"}) - allowed.get(command, set())
    assert not leaning, f"{command} imports {sorted(leaning)}"


def string_constants(tree) -> list[tuple[int, str]]:
  """String literals and f-string parts, without docstrings."""
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docstrings.add(id(body[0].value))
  return [(node.lineno, node.value) for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and isinstance(node.value, str)
          and id(node) not in docstrings]


def test_run_directory_names_are_spelled_in_workdir_only():
  spelled = []
  for name, path in module_files().items():
    if name == "jaxcls.workdir":
      continue
    for line, text in string_constants(ast.parse(path.read_text())):
      if (any(file in text for file in RUN_DIR_FILES)
          or any(text == folder or text.startswith(f"{folder}/") or
                 (folder.endswith("_") and text.startswith(folder))
                 for folder in RUN_DIR_FOLDERS)):
        spelled.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}")
  assert not spelled, "run-directory names outside jaxcls/workdir.py:\n" + "\n".join(spelled)


@pytest.mark.parametrize("name,limit", [("jaxcls.train", 150), ("*", 400)])
def test_modules_stay_small(name, limit):
  files = module_files()
  chosen = files if name == "*" else {name: files[name]}
  long = {n: len(p.read_text().splitlines()) for n, p in chosen.items()}
  long = {n: lines for n, lines in long.items() if lines > limit}
  assert not long, f"over {limit} lines: {long}"


def test_every_module_opens_with_its_job():
  missing = [name for name, path in module_files().items()
             if not ast.get_docstring(ast.parse(path.read_text()))]
  assert not missing, f"modules without a docstring: {missing}"


def test_every_module_has_its_test_file():
  """tests/test_<module>.py (test_data_<name>.py for jaxcls/data/<name>.py); the models
  package shares tests/test_models.py."""
  tests = PACKAGE.parent / "tests"
  missing = []
  for name in module_files():
    parts = name.split(".")[1:]
    if not parts or parts == ["data"]:
      continue  # the packages' __init__ files hold no code to test
    expected = "test_models.py" if parts[0] == "models" else f"test_{'_'.join(parts)}.py"
    if not (tests / expected).exists():
      missing.append(f"{name} -> tests/{expected}")
  assert not missing, "modules without a test file: " + ", ".join(missing)


def test_the_architecture_doc_lists_every_module():
  doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
  missing = []
  for name, path in module_files().items():
    relative = path.relative_to(PACKAGE.parent)
    if path.name == "__init__.py" or relative.parent.name == "models":
      continue  # jaxcls/models/ is listed as a package
    file_name = relative.as_posix()
    short = relative.name  # "tfds_source.py" in a row that names several data modules
    if f"`{file_name}`" not in doc and f"`{short}`" not in doc:
      missing.append(file_name)
  assert not missing, "docs/ARCHITECTURE.md's module table lacks: " + ", ".join(missing)
