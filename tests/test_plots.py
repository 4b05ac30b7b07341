"""The report a run draws: loss, accuracy, learning-rate, confusion-matrix and per-class
recall plots, and summary.md."""

from PIL import Image


def test_training_draws_the_report(trained_workdir):
  for name in ("loss.png", "accuracy.png", "learning_rate.png", "confusion_matrix.png",
               "per_class_recall.png"):
    path = trained_workdir / "report" / name
    with Image.open(path) as image:
      image.verify()
      assert image.format == "PNG" and min(image.size) >= 300
    assert path.stat().st_size > 10_000
  summary = (trained_workdir / "report" / "summary.md").read_text()
  assert "confusion_matrix.png" in summary and "airplane" in summary
