"""The report of a run: PNG plots and summary.md in <workdir>/report/, drawn from its files.

Everything is read back from metrics.jsonl and eval/*.json, so a report can be drawn at any
time, also while training runs or after it was killed (`python -m jaxcls.report --workdir`).
"""

import io

# Figures without pyplot: no display or backend needed, and a notebook's own backend
# (inline plots) is left alone.
from matplotlib.figure import Figure
import numpy as np

from jaxcls import metrics, storage
from jaxcls import workdir as workdir_lib


def _save(fig, path) -> None:
  """The figure as a PNG at path, locally or in a bucket (one upload)."""
  png = io.BytesIO()
  fig.savefig(png, format="png")
  storage.as_path(path).write_bytes(png.getvalue())


def _curve(path, title, ylabel, series):
  fig = Figure(figsize=(7, 4.5), dpi=110)
  ax = fig.subplots()
  for label, records, key in series:
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, label=label, marker="o" if len(points) < 20 else None)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.tight_layout()
  _save(fig, path)


def _confusion(path, result):
  names = result["per_class"]["class_names"]
  counts = np.asarray(result["confusion_matrix"])
  # Colour by the row fraction (recall per true class); annotate raw counts when readable.
  fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  size = min(4 + 0.45 * len(names), 24)
  fig = Figure(figsize=(size, size), dpi=110)
  ax = fig.subplots()
  image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
  if len(names) <= 40:
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
  if len(names) <= 20:
    for i in range(len(names)):
      for j in range(len(names)):
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                color="white" if fractions[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(f"Confusion matrix ({result['split']}, step {result['step']})")
  fig.tight_layout()
  _save(fig, path)


def _recall_bars(path, result):
  names = result["per_class"]["class_names"]
  recall = [np.nan if r is None else r for r in result["per_class"]["recall"]]
  fig = Figure(figsize=(max(6, 0.35 * len(names)), 4.5), dpi=110)
  ax = fig.subplots()
  ax.bar(range(len(names)), recall, color="tab:blue")
  if len(names) <= 60:
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
  ax.set_ylim(0, 1)
  ax.set_ylabel("recall")
  ax.set_title(f"Per-class recall ({result['split']}, step {result['step']})")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  _save(fig, path)


def write_report(workdir) -> list:
  """Draws every plot the files allow and summary.md; returns the paths written."""
  workdir_lib.report_dir(workdir).mkdir(parents=True, exist_ok=True)
  records = workdir_lib.read_metrics(workdir)
  train, evals = records.get("train", []), records.get("eval", [])
  written = []

  def target(plot):
    written.append(workdir_lib.report_plot_path(workdir, plot))
    return written[-1]

  if train or evals:
    _curve(target("loss"), "Loss", "loss",
           [("train", train, "loss"), ("eval", evals, "loss")])
    _curve(target("accuracy"), "Top-1 accuracy", "accuracy",
           [("train", train, "accuracy"), ("eval", evals, "accuracy")])
  if train:
    _curve(target("learning_rate"), "Learning rate", "learning rate",
           [("learning rate", train, "learning_rate")])
  result = workdir_lib.latest_eval(workdir)
  if result is not None:
    _confusion(target("confusion_matrix"), result)
    _recall_bars(target("per_class_recall"), result)

  lines = [f"# Report: {storage.absolute(workdir)}", ""]
  if result is not None:
    lines += [f"Evaluation of split `{result['split']}` at step {result['step']}:", "",
              "```", metrics.format_table(result), "```", ""]
  else:
    lines += ["No evaluation yet.", ""]
  lines += [f"![{p.name}]({p.name})" for p in written]
  summary = workdir_lib.report_summary_path(workdir)
  summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return written + [summary]
