"""`python -m jaxcls.predict --workdir DIR IMAGE_OR_FOLDER... [--top_k 5] [--json]
[--weights raw|ema]`

Top-k classes with probabilities for each image, from a run's checkpoint (the latest, or
--step). Folders are searched recursively for image files, as training finds them. Images go
through the run's eval preprocessing (decode to RGB, resize, center crop) and normalization.
A file that cannot be read or decoded is reported by name and the others are still
classified; the exit status is then 1. A run that kept a weight EMA predicts with it unless
config.ema.use_for_inference was False or --weights raw.
"""

import argparse
import json
import sys

import jax
import numpy as np

from jaxcls import build, ema, steps
from jaxcls import workdir as workdir_lib
from jaxcls.data import image_folder, images, sources, transforms
from jaxcls.errors import CheckpointError, DataError


def preprocess(path: str, data_config) -> np.ndarray:
  """One file -> the eval-preprocessed uint8 image; DataError naming the file if it fails."""
  name = image_folder.display(path)
  try:
    data = image_folder.read_file(path)
  except OSError as e:
    raise DataError(f"{name}: cannot be read ({e.strerror or e})") from None
  # Decoded here, not by the eval transforms' Decode: its message offers a training option.
  element = {"image": images.decode_image(data, name), "label": 0}
  for transform in transforms.eval_transforms(data_config):
    element = transform.map(element)
  return element["image"]


def check_top_k(top_k: int, num_classes: int) -> int:
  """--top_k must be at least 1; above the run's class count it shows them all (with a note)."""
  if top_k < 1:
    raise ValueError(f"--top_k {top_k}: use 1 to {num_classes} (the run's number of classes).")
  if top_k > num_classes:
    print(f"note: --top_k {top_k} is more than the run's {num_classes} classes; showing all "
          f"{num_classes}.", file=sys.stderr)
  return min(top_k, num_classes)


def predict(workdir: str, paths, top_k: int = 5, step: int | None = None,
            batch_size: int = 64, weights: str | None = None) -> list:
  """-> one record per image file, in order: {"file", "step", "top_k": [...]} or, for a file
  that could not be read or decoded, {"file", "error"}."""
  k = check_top_k(top_k, workdir_lib.load_run_config(workdir).data.num_classes)
  files, not_read = image_folder.find_images(paths)
  for line in not_read:
    print(f"note: not read: {line}", file=sys.stderr)
  parts = build.restore_for_inference(workdir, step)
  config, model, step = parts.config, parts.model, parts.step
  state = ema.weights_for(parts.state, weights or ema.default_weights(config))
  class_names = _class_names(workdir, config)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, steps.normalize(x, mean, std),
                                                          train=False)))
  results = []
  for start in range(0, len(files), batch_size):
    chunk = {}  # position in results -> preprocessed image
    for path in files[start:start + batch_size]:
      results.append({"file": image_folder.display(path)})
      try:
        chunk[len(results) - 1] = preprocess(path, config.data)
      except DataError as e:
        results[-1]["error"] = str(e)
    if not chunk:
      continue
    probs = np.asarray(apply(variables, np.stack(list(chunk.values()))))
    for position, p in zip(chunk, probs):
      best = np.argsort(-p, kind="stable")[:k]
      results[position].update(step=step, top_k=[
          {"class": class_names[i], "index": int(i), "probability": float(p[i])} for i in best])
  return results


def _class_names(workdir: str, config) -> list:
  """The names training wrote to the run directory; else from the run's data source."""
  names = workdir_lib.read_class_names(workdir)
  if names is not None:
    return names
  return list(sources.create_source(config.data, config.data.eval_split).class_names)


def main(argv=None):
  parser = argparse.ArgumentParser(description="Classify images with a jaxcls run.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("paths", nargs="+", help="image files or folders")
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--weights", choices=ema.WEIGHTS, default=None,
                      help="'ema': the run's weight EMA; default: as config.ema says")
  args = parser.parse_args(argv)
  try:
    results = predict(args.workdir, args.paths, args.top_k, args.step, weights=args.weights)
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  failed = [r for r in results if "error" in r]
  if args.json:
    print(json.dumps(results, indent=2))
  else:
    for r in results:
      if "error" in r:
        print(f"error: {r['error']}", file=sys.stderr)
        continue
      print(r["file"])
      for rank, entry in enumerate(r["top_k"], 1):
        print(f"  {rank}. {entry['class']:<20} {entry['probability']:.4f}")
  if failed:
    names = ", ".join(r["file"] for r in failed[:5]) + (", ..." if len(failed) > 5 else "")
    sys.exit(f"{len(failed)} of {len(results)} images could not be classified: {names}")


if __name__ == "__main__":
  main()
