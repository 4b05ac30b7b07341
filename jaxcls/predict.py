"""`python -m jaxcls.predict --workdir DIR IMAGE_OR_FOLDER... [--top_k 5] [--json]`

Top-k classes with probabilities for each image, from a run's checkpoint (the latest, or
--step). Folders are searched recursively for image files. Images go through the run's eval
preprocessing (decode to RGB, resize, center crop) and normalization.
"""

import argparse
import json
import sys

import jax
import numpy as np

from jaxcls import build, steps
from jaxcls import workdir as workdir_lib
from jaxcls.data import image_folder, sources, transforms
from jaxcls.errors import CheckpointError

def preprocess(path: str, data_config) -> np.ndarray:
  with open(path, "rb") as f:
    element = {"image": np.frombuffer(f.read(), np.uint8), "label": 0}
  for transform in transforms.eval_transforms(data_config):
    element = transform.map(element)
  return element["image"]


def predict(workdir: str, paths, top_k: int = 5, step: int | None = None,
            batch_size: int = 64) -> list:
  parts = build.restore_for_inference(workdir, step)
  config, model, state, step = parts.config, parts.model, parts.state, parts.step
  files = image_folder.find_images(paths)
  class_names = _class_names(workdir, config)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, steps.normalize(x, mean, std),
                                                          train=False)))
  k = min(top_k, len(class_names))
  results = []
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    images = np.stack([preprocess(p, config.data) for p in chunk])
    probs = np.asarray(apply(variables, images))
    for path, p in zip(chunk, probs):
      best = np.argsort(-p, kind="stable")[:k]
      results.append({"file": path, "step": step, "top_k": [
          {"class": class_names[i], "index": int(i), "probability": float(p[i])} for i in best]})
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
  args = parser.parse_args(argv)
  try:
    results = predict(args.workdir, args.paths, args.top_k, args.step)
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  if args.json:
    print(json.dumps(results, indent=2))
    return
  for r in results:
    print(r["file"])
    for rank, entry in enumerate(r["top_k"], 1):
      print(f"  {rank}. {entry['class']:<20} {entry['probability']:.4f}")


if __name__ == "__main__":
  main()
