"""Fine-tune ImageNet ResNet-50 weights on your own image folder (docs/guide.md "Start from
pretrained weights").

Convert the weights once (torchvision or timm, see the guide), then train on a folder of
`root/<class_name>/<image>` files, holding out 10% of each class for evaluation:

    python -m jaxcls.weights import resnet50.safetensors --model resnet50 --out weights/resnet50
    python -m jaxcls.main --config configs/finetune_resnet50.py --workdir runs/finetune \
        --config.model.init_from=weights/resnet50 \
        --config.data.path=/path/to/images --config.data.num_classes=5

The 1000-class ImageNet head is replaced by a new one for num_classes (the log says so);
everything else starts from the weights. Recipe: random-resized-crop 224 + flip, eval resize
256 + center crop 224, ImageNet mean / std (what torchvision's and timm's ResNet-50 weights
were trained with), 10 epochs of batch 64, SGD Nesterov, lr 0.01 for the new head and 10x
lower for the pretrained backbone (optim.backbone_lr_scale), 0.5 warmup epochs then cosine,
weight decay 1e-4, label smoothing 0.1.

Expected: not measured here. These are common fine-tuning starting points, not tuned
on a dataset: this machine has neither ImageNet weights nor a GPU. What was measured is the
path at a small scale (the guide's section: weights exported from a run, imported back, and
fine-tuned on the bundled sample) and the import's logits against torchvision's (resnet18
and resnet50 at 224px agree to within 1e-4, tests/test_weights.py). On a CPU a ResNet-50 at
224px trains at a few images per second; use a GPU or a TPU.
"""

from jaxcls.config import base_config


def get_config(arg: str = ""):
  del arg
  config = base_config()
  config.data.source = "image_folder"
  config.data.path = ""  # set on the command line: the folder of class folders
  config.data.eval_fraction = 0.1  # or set data.eval_path to a second folder
  config.data.num_classes = 5  # set to your folder's class count
  config.data.image_size = 224
  config.data.train_augment = "random_resized_crop_flip"
  config.data.eval_resize = 256
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)

  config.model.name = "resnet50"
  config.model.stem = "imagenet"
  config.model.width = 64
  config.model.init_from = ""  # set on the command line: an export directory or .safetensors

  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 10.0
  config.optim.learning_rate = 0.01
  config.optim.backbone_lr_scale = 0.1
  config.optim.schedule = "cosine"
  config.optim.warmup_epochs = 0.5
  config.optim.nesterov = True
  config.optim.weight_decay = 1e-4
  config.optim.label_smoothing = 0.1
  config.log_every_steps = 20
  config.eval_every_epochs = 1.0
  return config
