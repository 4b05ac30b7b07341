"""`python -m jaxcls.predict`: a run's classes for image files and folders, as a table or JSON."""

import json

import numpy as np
from PIL import Image

from runner import run_tool


def test_predict_table_and_json(trained_workdir, tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / "images"
  (folder / "sub").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
  Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
  table = run_tool("jaxcls.predict", "--workdir", trained_workdir, folder, "--top_k", 3)
  assert table.returncode == 0, table.stderr[-3000:]
  assert "a.png" in table.stdout and "b.jpg" in table.stdout and "  3. " in table.stdout
  as_json = run_tool("jaxcls.predict", "--workdir", trained_workdir, folder / "a.png", "--json")
  assert as_json.returncode == 0, as_json.stderr[-3000:]
  [entry] = json.loads(as_json.stdout)
  probabilities = [e["probability"] for e in entry["top_k"]]
  assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
  assert 0 < sum(probabilities) <= 1.0001
