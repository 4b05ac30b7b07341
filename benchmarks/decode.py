"""Images/s per core of decode + crop on real photographs: a plain PIL loop, jaxcls's path on
main (b07af50), and today's path with DCT-reduced JPEG decoding; and how far today's crops are
from a full decode's.

    PYTHONPATH=. python benchmarks/decode.py                  # both sizes, 5 rounds of ~3 s
    PYTHONPATH=. python benchmarks/decode.py --rounds 3 --seconds 1 --json /tmp/decode.json

The photos are the real ones scikit-image and scikit-learn ship (astronaut, coffee, chelsea,
rocket, camera man, ..., china, flower), resized to 500x375 (near ImageNet's average) and
1024x768, saved as JPEGs of quality 90. Every contender gets the same files and the same
random crops (one seeded generator per image and round), single-threaded, timed by this
process's CPU time (`time.process_time`): images per CPU-second is the per-core rate.

Contenders, per size:
  pil      the plain loop: PIL decodes in full, RandomResizedCrop's box, PIL's resize(box=)
           of the whole image, flip (as torchvision's ImageFolder + RandomResizedCrop do).
  main     jaxcls on main: images.decode_image (OpenCV, full size), then PIL's resize(box=)
           of the whole decoded image, flip.
  reduced  jaxcls now: transforms.decode_random_resized_crop_flip (the box from the JPEG
           header, a decode at 1/2, 1/4 or 1/8 when the crop stays >= 224 px, only the box
           handed to PIL).
  converted  the same, on the files `python -m jaxcls.data.convert` writes by default now
           (--resize 320 --quality 90: shorter side 320, bicubic): other pixels, so it is
           the speed a user of the defaults gets, not a like-for-like comparison.
and the eval path (resize shorter side to 256 + center crop 224): main's against now's.
Then a decoder row: one JPEG decoded at half size by OpenCV (IMREAD_REDUCED_COLOR_2), PIL
(draft) and simplejpeg (min_width / min_height), and in full by each.

Fidelity: over every file and 20 seeds, now's crop against the full-decode crop of the same
box: mean absolute difference (of 255) and PSNR, over all crops and over the changed ones.
"""

import argparse
import io
import json
import math
import platform
import statistics
import time

import cv2
import numpy as np
from PIL import Image
import simplejpeg

from jaxcls.data import convert
from jaxcls.data import images
from jaxcls.data import transforms

SIZES = ((500, 375), (1024, 768))
CROP = 224
EVAL_RESIZE = 256


def photographs() -> list[np.ndarray]:
  """The colour photographs that scikit-image and scikit-learn ship, as RGB arrays."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket(), skimage.data.immunohistochemistry(),
            skimage.data.camera()]
  photos += list(datasets.load_sample_images().images)
  return [np.asarray(Image.fromarray(p).convert("RGB")) for p in photos]


def jpeg_files(size: tuple[int, int], quality: int = 90) -> list[bytes]:
  files = []
  for photo in photographs():
    out = io.BytesIO()
    Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC).save(
        out, "JPEG", quality=quality)
    files.append(out.getvalue())
  return files


def _pil_loop(data: bytes, rng) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as pil:
    pil = pil.convert("RGB")
    left, top, cw, ch = transforms.random_resized_crop_box(pil.height, pil.width, rng)
    out = np.asarray(pil.resize((CROP, CROP), Image.Resampling.BILINEAR,
                                box=(left, top, left + cw, top + ch)))
  return out[:, ::-1] if rng.integers(2) else out


def _main_path(data: bytes, rng) -> np.ndarray:
  """jaxcls on main: a full decode, then one PIL call on the whole image."""
  image = images.decode_image(data)
  left, top, cw, ch = transforms.random_resized_crop_box(*image.shape[:2], rng)
  out = np.asarray(Image.fromarray(image).resize(
      (CROP, CROP), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch)))
  return out[:, ::-1] if rng.integers(2) else out


def _reduced_path(data: bytes, rng) -> np.ndarray:
  return transforms.decode_random_resized_crop_flip(data, CROP, rng)


_CONVERTED = {}  # original file -> what the converter's defaults store for it


def _convert(data: bytes) -> bytes:
  image = images.decode_image(data)
  if min(image.shape[:2]) <= convert.DEFAULT_RESIZE:
    return data
  small = transforms.resize_shorter_side(image, convert.DEFAULT_RESIZE, Image.Resampling.BICUBIC)
  out = io.BytesIO()
  Image.fromarray(small).save(out, "JPEG", quality=convert.DEFAULT_QUALITY)
  return out.getvalue()


def _converted_path(data: bytes, rng) -> np.ndarray:
  return _reduced_path(_CONVERTED[data], rng)


def _main_eval(data: bytes, rng) -> np.ndarray:
  del rng
  image = transforms.resize_shorter_side(images.decode_image(data), EVAL_RESIZE)
  h, w = image.shape[:2]
  top, left = (h - CROP) // 2, (w - CROP) // 2
  return image[top:top + CROP, left:left + CROP]


def _reduced_eval(data: bytes, rng) -> np.ndarray:
  del rng
  return transforms.decode_resize_center_crop(data, CROP, EVAL_RESIZE)


def _decoder(library: str, reduction: int):
  """fn(data, rng): one JPEG decoded by `library` at 1/reduction (1 or 2) of its size."""
  def opencv(data):
    flag = cv2.IMREAD_REDUCED_COLOR_2 if reduction == 2 else cv2.IMREAD_COLOR
    return cv2.imdecode(np.frombuffer(data, np.uint8), flag)

  def pil(data):
    with Image.open(io.BytesIO(data)) as image:
      if reduction > 1:
        image.draft("RGB", (image.width // reduction, image.height // reduction))
      return np.asarray(image.convert("RGB"))

  def simple(data):
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return simplejpeg.decode_jpeg(data, min_width=width // reduction,
                                  min_height=height // reduction)

  decode = {"opencv": opencv, "pil": pil, "simplejpeg": simple}[library]
  return lambda data, rng: decode(data)


def _timed(fn, files: list[bytes], passes: int, seed: int) -> float:
  """Images per CPU-second of `passes` passes over `files`, each image its own seeded rng."""
  start = time.process_time()
  for p in range(passes):
    for i, data in enumerate(files):
      fn(data, np.random.default_rng((seed, p, i)))
  return passes * len(files) / max(time.process_time() - start, 1e-9)


def compare(contenders: dict, files: list[bytes], rounds: int, seconds: float) -> dict:
  """{name: [images/s per round]}, in turns (the order reversed every other round)."""
  slowest = max(1 / _timed(fn, files[:2], 1, 0) for fn in contenders.values())
  passes = max(1, round(seconds / (slowest * len(files))))
  rates = {name: [] for name in contenders}
  names = list(contenders)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      rates[name].append(_timed(contenders[name], files, passes, r))
  return rates


def _error_stats(errors: list[np.ndarray]) -> dict:
  if not errors:
    return {"crops": 0}
  mse = statistics.fmean(float((e ** 2).mean()) for e in errors)
  return {"crops": len(errors), "mean_abs": statistics.fmean(float(e.mean()) for e in errors),
          "psnr_db": 10 * math.log10(255 ** 2 / mse) if mse else math.inf}


def fidelity(files: list[bytes], seeds: int = 20) -> dict:
  """Now's crops against the full-decode crops of the same boxes: mean |diff| and PSNR, over
  all crops and over those that differ at all ("changed": a reduced decode, or PIL's
  rounding), for train and eval."""
  train, evals = [], []
  for data in files:
    full = images.decode_image(data)
    for seed in range(seeds):
      new = _reduced_path(data, np.random.default_rng(seed)).astype(np.float64)
      train.append(np.abs(new - transforms.random_resized_crop_flip(
          full, CROP, np.random.default_rng(seed))))
    new = _reduced_eval(data, None).astype(np.float64)
    evals.append(np.abs(new - _main_eval(data, None)))
  return {f"{path} {part}": _error_stats([e for e in errors if part == "all" or e.any()])
          for path, errors in (("train", train), ("eval", evals)) for part in ("all", "changed")}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--seconds", type=float, default=3.0, help="per contender and round")
  parser.add_argument("--seeds", type=int, default=20, help="crops per file for the fidelity")
  parser.add_argument("--json", help="write the figures here too")
  args = parser.parse_args(argv)
  cv2.setNumThreads(1)  # per core: OpenCV would otherwise spread a decode over threads
  result = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}), "
                       f"{time.strftime('%Y-%m-%d')}", "rows": []}
  print(f"{result['machine']}; images per CPU-second, median over {args.rounds} rounds")
  groups = {
      "train": {"pil": _pil_loop, "main": _main_path, "reduced": _reduced_path,
                "converted": _converted_path},
      "eval": {"main": _main_eval, "reduced": _reduced_eval},
      **{f"decode 1/{r}": {lib: _decoder(lib, r) for lib in ("opencv", "pil", "simplejpeg")}
         for r in (2, 1)},
  }
  for width, height in SIZES:
    files = jpeg_files((width, height))
    _CONVERTED.update({data: _convert(data) for data in files})
    for group, contenders in groups.items():
      rates = compare(contenders, files, args.rounds, args.seconds)
      row = {"size": f"{width}x{height}", "path": group,
             **{name: statistics.median(r) for name, r in rates.items()}}
      base = "pil" if group == "train" else next(iter(contenders))
      for name in contenders:
        if name != base:
          per_round = [a / b for a, b in zip(rates[name], rates[base])]
          row[f"{name}/{base}"] = statistics.median(per_round)
      if group == "train":
        for name in ("reduced", "converted"):
          row[f"{name}/main"] = statistics.median(
              a / b for a, b in zip(rates[name], rates["main"]))
      result["rows"].append(row)
      print(f"{width}x{height} {group:10s} " + "  ".join(
          f"{k} {v:,.2f}" if "/" in k else f"{k} {v:,.0f}" for k, v in row.items()
          if k not in ("size", "path")))
    quality = fidelity(files, args.seeds)
    result["rows"].append({"size": f"{width}x{height}", "path": "fidelity", **quality})
    print(f"{width}x{height} fidelity   now vs a full decode, same boxes: " + "; ".join(
        f"{key}: {q['crops']} crops" + (f", mean |diff| {q['mean_abs']:.3f} of 255, PSNR "
                                        f"{q['psnr_db']:.1f} dB" if q["crops"] else "")
        for key, q in quality.items()))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
