"""ResNet-50 on ImageNet with a 32k global batch: LARS, in the manner of the MLPerf reference.

The data, model and evaluation of configs/imagenet_resnet50.py; what changes is the
optimizer for a batch of 32,768: LARS (layer-wise trust ratio, coefficient 0.001, epsilon 0,
momentum 0.9) with BatchNorm parameters and biases left out of both weight decay and the
trust ratio, a linear warmup over 18 epochs to a peak learning rate of 29 (no linear
scaling: the trust ratio sets each layer's step), then polynomial decay of power 2 to 1e-4
at the end of 44 epochs; weight decay 5e-5, label smoothing 0.1.

    python -m jaxcls.main --config configs/imagenet_resnet50_lars.py --workdir runs/in1k_lars \
        --config.data.path=/path/to/tfds_data_dir

The batch is global: on fewer devices than it takes to hold 32,768 images at once, set
config.grad_accum_steps (micro-batches per step; docs/guide.md "Concepts").

Expected: not measured. Checked by step parity only: tests/test_optim.py runs a few steps
of this config on a tiny model and synthetic data and compares each with optax's own LARS on
the same gradients. It was not trained to the end here (no ImageNet, no accelerators of that
size); the numbers above are of the kind published for LARS at this batch size (You et al.
2017, the MLPerf submissions, whose target is 75.9% top-1), a starting point rather than a
tuned recipe.
"""

import os

from jaxcls.config import load_config


def get_config(arg: str = ""):
  del arg
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "imagenet_resnet50.py"))
  config.batch_size = 32768
  config.num_epochs = 44.0
  config.eval_every_epochs = 4.0
  config.optim.name = "lars"
  config.optim.learning_rate = 29.0
  config.optim.lr_scaling = "none"
  config.optim.warmup_epochs = 18.0
  config.optim.schedule = "polynomial"
  config.optim.polynomial_power = 2.0
  config.optim.end_learning_rate = 1e-4
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.trust_coefficient = 0.001
  config.optim.eps = 0.0
  config.optim.weight_decay = 5e-5  # kernels only: LARS skips BatchNorm and biases
  config.optim.label_smoothing = 0.1
  return config
