"""Both notebooks in colab/ run top to bottom in a fresh Jupyter kernel, as a user would run
them, with small settings injected after their `parameters` cell (as papermill does)."""

import json
import os

import nbclient
import nbformat
import pytest

from runner import REPO

pytestmark = pytest.mark.slow


def execute(name: str, parameters: dict) -> nbformat.NotebookNode:
  """Runs colab/<name> from the colab/ folder (inside this checkout); returns it with outputs."""
  notebook = nbformat.read(REPO / "colab" / name, as_version=4)
  index = next(i for i, cell in enumerate(notebook.cells)
               if "parameters" in cell.metadata.get("tags", []))
  injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  notebook.cells.insert(index + 1, injected)
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO / "colab")}})
  client.execute()  # raises CellExecutionError naming the cell and the traceback
  return notebook


def outputs(notebook, kind: str) -> list:
  """Every stream text (kind='text') or PNG (kind='image/png') the notebook displayed."""
  found = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      if kind == "text" and output.output_type == "stream":
        found.append(output.text)
      elif kind != "text" and kind in output.get("data", {}):
        found.append(output.data[kind])
  return found


def test_quickstart_trains_shows_plots_and_predicts(tmp_path):
  workdir = tmp_path / "quickstart"
  notebook = execute("quickstart.ipynb", {
      "WORKDIR": str(workdir), "NUM_PICTURES": 10,
      "OVERRIDES": {"num_train_steps": 40, "log_every_steps": 20, "model.width": 8}})
  text = "".join(outputs(notebook, "text"))
  assert "step 40/40" in text and "pictures classified correctly" in text
  # Loss, accuracy and confusion matrix from the report, then the predicted pictures.
  assert len(outputs(notebook, "image/png")) == 4
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 40 and results["eval"]["num_examples"] == 2000
  assert len(os.listdir(workdir / "pictures")) == 10  # one folder per class


def test_tpu_notebook_shrunk_trains_resnet50_on_array_records_and_evaluates(tmp_path):
  workdir = tmp_path / "resnet50"
  notebook = execute("tpu_imagenet.ipynb", {
      "WORKDIR": str(workdir), "SMALL": True, "ZERO_STAGE": 2,
      "OVERRIDES": {"model.width": 8, "num_train_steps": 4, "batch_size": 64,
                    "eval_batch_size": 256, "log_every_steps": 2}})
  text = "".join(outputs(notebook, "text"))
  assert "8 device(s)" in text and "'fsdp': 8" in text
  assert "2 |" in text and "<- ZERO_STAGE" in text
  assert "resnet50" in text and "step 4/4" in text
  assert sorted(p.name for p in (tmp_path / "resnet50_data").glob("*.json")) == [
      "test.json", "train.json"]
  evaluation = json.loads((workdir / "eval" / "test_4.json").read_text())
  assert evaluation["num_examples"] == 2000 and len(evaluation["confusion_matrix"]) == 10
  assert len(outputs(notebook, "image/png")) == 1
