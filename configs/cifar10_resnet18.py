"""ResNet-18 (small-image stem) on the full CIFAR-10, the fast recipe for one GPU.

Data: CIFAR-10 as two .npz files (train.npz / test.npz: `jpeg`, `offsets`, `labels`,
`class_names`; the format of jaxcls/data/bundled) in a directory you name:

    python -m jaxcls.main --config configs/cifar10_resnet18.py --workdir runs/c10 \
        --config.data.path=/path/to/cifar10_jpeg

Recipe: SGD Nesterov, peak lr 0.4 at batch 512, 2 warmup epochs, cosine to 0, weight decay
5e-4 on kernels, label smoothing 0.1, pad-4 crop + flip, bfloat16 compute (on a GPU), 30 epochs.
Expected: about 90% test accuracy on the JPEG copy of CIFAR-10 (a hand-written loop with this
recipe reached 90.3% after 30 epochs on one H200; the JPEG files cost a few points against
published CIFAR-10 results). `:epochs=60` trains 60 epochs (about 91%).
"""

from jaxcls.config import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.data.source = "npz"
  config.data.path = ""  # required: the directory holding train.npz and test.npz
  config.data.num_classes = 10
  config.data.image_size = 32
  config.data.train_augment = "pad_crop_flip"
  config.data.num_workers = 4

  config.model.name = "resnet18"
  config.model.stem = "small"
  config.model.dtype = "auto"  # bfloat16 on GPU / TPU, float32 on CPU

  config.batch_size = 512
  config.eval_batch_size = 1000
  config.num_epochs = 30.0
  config.optim.learning_rate = 0.4
  config.optim.warmup_epochs = 2.0
  config.optim.weight_decay = 5e-4
  config.optim.label_smoothing = 0.1
  config.log_every_steps = 100
  config.eval_every_epochs = 5.0
  if arg.startswith("epochs="):
    config.num_epochs = float(arg.split("=", 1)[1])
  return config
