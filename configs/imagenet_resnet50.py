"""ResNet-50 on ImageNet: the standard 90-epoch recipe (Goyal et al. 2017; flax's example).

Batch 1024, lr 0.1 x batch/256 (linear scaling), 5 warmup epochs then cosine, weight decay
1e-4 on kernels only, label smoothing 0.1, random-resized-crop 224 + flip, eval resize 256 +
center crop 224, zero-initialised last BatchNorm of each block, bfloat16 compute.

    python -m jaxcls.main --config configs/imagenet_resnet50.py --workdir runs/in1k \
        --config.data.path=/path/to/tfds_data_dir

Expected: about 76-77% top-1 on the validation split after 90 epochs (the published result of
this recipe). Prepare the data once with TFDS (`tfds build imagenet2012
--file_format=array_record`, see docs/guide.md "Bringing your data"), or convert an image folder with
`python -m jaxcls.data.convert` (shorter side 320 by default) and set source='array_record'.
On many GPUs per host, config.data.decoder='dali' decodes on the GPUs (docs/guide.md).
"""

from jaxcls.config import base_config


def get_config(arg: str = ""):
  del arg
  config = base_config()
  config.data.source = "tfds"
  config.data.tfds_name = "imagenet2012"
  config.data.path = ""  # the TFDS data_dir holding the prepared (ArrayRecord) dataset
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.num_classes = 1000
  config.data.image_size = 224
  config.data.train_augment = "random_resized_crop_flip"
  config.data.eval_resize = 256
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  config.data.num_workers = -1  # this process's share of the host's cores, minus 2

  config.model.name = "resnet50"
  config.model.stem = "imagenet"
  config.model.dtype = "auto"  # bfloat16 on GPU / TPU, float32 on CPU
  config.model.zero_init_residual = True

  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.num_epochs = 90.0
  config.optim.learning_rate = 0.1
  config.optim.lr_scaling = "linear"
  config.optim.base_batch_size = 256
  config.optim.schedule = "cosine"
  config.optim.warmup_epochs = 5.0
  config.optim.nesterov = False
  config.optim.weight_decay = 1e-4
  config.optim.label_smoothing = 0.1
  config.log_every_steps = 100
  config.eval_every_epochs = 1.0
  return config
