"""Where the time of one 224 px random-resized crop of a 500x375 JPEG goes (CPU microseconds
per image, one thread; two of scikit-learn's photographs at quality 90, the same seeded
boxes for every line). Answers whether the 2.5x per-core target of issue #14 can be reached
at this size: see benchmarks/README.md.

    PYTHONPATH=. python benchmarks/decode_breakdown.py
"""

import io
import time

import cv2
import numpy as np
import simplejpeg
from PIL import Image
from sklearn.datasets import load_sample_images

from jaxcls.data import transforms

SIZE = 224


def microseconds(fn, n: int = 400) -> float:
  start = time.process_time()
  for i in range(n):
    fn(i)
  return (time.process_time() - start) / n * 1e6


def main():
  cv2.setNumThreads(1)  # per core: OpenCV's own threads would count in process_time
  files = []
  for photo in load_sample_images().images:
    buffer = io.BytesIO()
    Image.fromarray(photo).resize((500, 375)).save(buffer, "JPEG", quality=90)
    files.append(buffer.getvalue())
  rng = np.random.default_rng(0)
  pixels = simplejpeg.decode_jpeg(files[0])
  boxes = [transforms.random_resized_crop_box(375, 500, rng) for _ in range(400)]

  def crop(i):
    left, top, width, height = boxes[i]
    return pixels[int(top):int(top + height), int(left):int(left + width)]

  def pil_resize(i):
    left, top, width, height = boxes[i]
    return transforms.resize_box(pixels, (left, top, left + width, top + height), SIZE)

  rows = {
      "jaxcls's whole path (decode, box, resize, flip)":
          lambda i: transforms.decode_random_resized_crop_flip(files[i % 2], SIZE, rng),
      "full decode, simplejpeg": lambda i: simplejpeg.decode_jpeg(files[i % 2]),
      "full decode, OpenCV": lambda i: cv2.imdecode(np.frombuffer(files[i % 2], np.uint8),
                                                    cv2.IMREAD_COLOR),
      "resize of the box, PIL bilinear antialiased (jaxcls)": pil_resize,
  }
  for name, flag in [("AREA", cv2.INTER_AREA), ("LINEAR (no antialias)", cv2.INTER_LINEAR),
                     ("CUBIC (no antialias)", cv2.INTER_CUBIC)]:
    rows[f"resize of the box, OpenCV {name}"] = (
        lambda i, flag=flag: cv2.resize(crop(i), (SIZE, SIZE), interpolation=flag))
  for name, fn in rows.items():
    print(f"{microseconds(fn):7.0f} us  {name}")
  print(f"median box width {np.median([b[2] for b in boxes]):.0f} px")


if __name__ == "__main__":
  main()
