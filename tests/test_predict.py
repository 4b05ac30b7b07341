"""`python -m jaxcls.predict`: a run's classes for image files and folders, as a table or JSON;
a bad file reported by name while the rest are classified; bad flags and run directories
answered with one line."""

import json
import os
import shutil

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
  as_json = run_tool("jaxcls.predict", "--workdir", trained_workdir, folder / "a.png", "--json",
                     devices=1)  # trained on 8
  assert as_json.returncode == 0, as_json.stderr[-3000:]
  [entry] = json.loads(as_json.stdout)
  probabilities = [e["probability"] for e in entry["top_k"]]
  assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
  assert 0 < sum(probabilities) <= 1.0001


def test_a_bad_image_is_reported_by_name_and_the_rest_classified(trained_workdir, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  Image.new("RGB", (20, 20), (200, 10, 10)).save(folder / "a.png")
  (folder / "b.png").write_bytes(b"not an image at all")
  Image.new("RGB", (20, 20), (10, 10, 200)).save(os.path.join(os.fsencode(folder), b"caf\xe9.png"))
  os.mkfifo(folder / "pipe.png")  # in a folder: left out with a note, never opened
  table = run_tool("jaxcls.predict", "--workdir", trained_workdir, folder, "--top_k", 2,
                   timeout=300)
  assert table.returncode == 1, table.stderr[-3000:]
  assert table.stdout.splitlines()[::3] == [str(folder / "a.png"), f"{folder}/caf\\xe9.png"]
  assert f"note: not read: {folder / 'pipe.png'}: a named pipe" in table.stderr
  assert f"error: {folder / 'b.png'}: not an image in a known format" in table.stderr
  assert table.stderr.rstrip().endswith(
      f"1 of 3 images could not be classified: {folder / 'b.png'}")
  assert "skip_corrupt" not in table.stderr and "Traceback" not in table.stderr

  # More than the run's 10 classes: all 10, with a note; the bad file is an entry with its error.
  as_json = run_tool("jaxcls.predict", "--workdir", trained_workdir, folder / "b.png",
                     folder / "a.png", "--top_k", 20, "--json", timeout=300)
  assert as_json.returncode == 1, as_json.stderr[-3000:]
  bad, good = json.loads(as_json.stdout)
  assert bad["file"] == str(folder / "b.png") and "not an image" in bad["error"]
  assert len(good["top_k"]) == 10 and "error" not in good
  assert "note: --top_k 20 is more than the run's 10 classes; showing all 10." in as_json.stderr


def test_top_k_below_one_is_an_error_naming_the_flag(trained_workdir, tmp_path):
  Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
  for top_k in (0, -3):
    result = run_tool("jaxcls.predict", "--workdir", trained_workdir, tmp_path / "a.png",
                      "--top_k", top_k)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"error: --top_k {top_k}: use 1 to 10 (the run's number "
                                     "of classes).")


def test_a_damaged_config_or_a_run_without_checkpoints_is_one_line(trained_workdir, tmp_path):
  Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
  run = tmp_path / "run"
  run.mkdir()
  shutil.copy(trained_workdir / "config.json", run / "config.json")
  for tool in ("jaxcls.predict", "jaxcls.evaluate"):
    args = (tmp_path / "a.png",) if tool == "jaxcls.predict" else ()
    result = run_tool(tool, "--workdir", run, *args)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: No checkpoint in {run / 'checkpoints'}: the run in {run} has saved none (it "
        "has only its config); train it, or pick a run that saved one.")
  assert not (run / "checkpoints").exists()

  (run / "config.json").write_text((run / "config.json").read_text()[:200])  # cut short
  result = run_tool("jaxcls.predict", "--workdir", run, tmp_path / "a.png")
  assert result.returncode == 1
  assert result.stderr.startswith(f"error: {run / 'config.json'} cannot be read as the run's "
                                  "config (")
  assert "Traceback" not in result.stderr
