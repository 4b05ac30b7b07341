"""ResNet-50 on ImageNet in 24 epochs with progressive resizing, in the style of FFCV.

FFCV (github.com/libffcv/ffcv-imagenet, its README's table; their figures, measured by them on
8 x A100, not reproduced here) trains ResNet-50 to 73.8% top-1 in 16 epochs, 75.6% in 24,
76.6% in 32 and 77.2% in 40, with low-resolution training that rises from 160 to 192 px in
the last epochs, evaluation at a higher resolution, a short linear warmup, label smoothing
and test-time flips. This config is jaxcls's reading of that idea, with our own choices:
160 px for epochs 0-12 and 192 px from epoch 13 (`config.data.resize_schedule`, one step
compiled per size), evaluation at 224 (resize 256, center crop), batch 1024 at lr 0.1 x
batch/256 with 2 warmup epochs and a cosine decay, flip test-time augmentation. Checked here
only by running all 24 epochs of it with a tiny model on 32 synthetic images on CPU
(tests/test_data_resolution.py).

Expected: not measured (never trained on ImageNet here); FFCV's own 24-epoch recipe reports
75.6% top-1.

    python -m jaxcls.main --config configs/imagenet_resnet50_fast.py --workdir runs/in1k_fast \
        --config.data.path=/path/to/tfds_data_dir
"""

import os

from jaxcls.config import load_config


def get_config(arg: str = ""):
  del arg
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "imagenet_resnet50.py"))
  config.num_epochs = 24.0
  config.data.resize_schedule = ((0, 160), (13, 192))  # evaluation stays at image_size 224
  config.optim.warmup_epochs = 2.0
  config.eval_every_epochs = 4.0
  config.eval_tta = "flip"
  return config
