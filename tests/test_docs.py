"""The user guide stays true to the code: its config keys, modules and files exist, and
scripts/run_guide.py finds its command blocks and the ones marked as not runnable here."""

import importlib.util
import re
import sys

import pytest

from jaxcls import config as config_lib
from runner import REPO

sys.path.insert(0, str(REPO / "scripts"))
import run_guide  # pylint: disable=g-import-not-at-top,wrong-import-position

DOCS = [REPO / "README.md", REPO / "docs" / "guide.md", REPO / "docs" / "ARCHITECTURE.md"]


def test_run_guide_finds_blocks_and_skip_markers():
  markdown = "\n".join([
      "# Install", "```bash", "pip install .", "```", "",
      "<!-- not run here: needs a GPU -->", "```bash", "pip install '.[cuda]'", "```",
      "## Python", "```python", "print(1)", "```",
      "<!-- not run here: only marks the next block -->", "text in between",
      "```bash", "echo runs", "```", "```text", "not a command", "```"])
  found = run_guide.blocks(markdown)
  assert [(b["language"], b["code"], b["skip"], b["section"]) for b in found] == [
      ("bash", "pip install .\n", None, "Install"),
      ("bash", "pip install '.[cuda]'\n", "needs a GPU", "Install"),
      ("python", "print(1)\n", None, "Python"),
      ("bash", "echo runs\n", None, "Python"),
  ]


def test_the_guide_has_runnable_blocks_and_says_why_others_are_not_run():
  found = run_guide.blocks((REPO / "docs" / "guide.md").read_text())
  runnable = [b for b in found if not b["skip"]]
  assert len(runnable) >= 20
  assert all(len(b["skip"]) > 5 for b in found if b["skip"])
  sections = {b["section"] for b in runnable}
  for section in ("Install", "An image folder", "ArrayRecord files", "On one machine",
                  "Checkpoints and resume", "A hang at start-up", "A slow input pipeline"):
    assert section in sections


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_config_keys_in_the_docs_exist(doc):
  known = config_lib._flat_keys(config_lib.base_config())  # pylint: disable=protected-access
  text = doc.read_text()
  keys = set(re.findall(r"(?:--|`)config\.([a-z_]+(?:\.[a-z_0-9]+)*)(?![\w(])", text))
  keys -= {"key", "model.widht", "json"}  # generic form, deliberate typo, config.json
  unknown = [k for k in keys if k not in known and not any(q.startswith(k + ".") for q in known)]
  assert not unknown, f"{doc.name} names config keys that do not exist: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_modules_and_files_named_in_the_docs_exist(doc):
  text = doc.read_text()
  for module in set(re.findall(r"python -m (jaxcls[\w.]*)", text)):
    assert importlib.util.find_spec(module), f"{doc.name}: no module {module}"
  for path in set(re.findall(r"\b((?:scripts|benchmarks|configs|colab|tests)/[\w./-]+\.\w+)",
                             text)):
    assert (REPO / path).exists(), f"{doc.name} names {path}, which does not exist"
