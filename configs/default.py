"""Default config: a small CNN on the bundled CIFAR-10 sample, sized for a 2-core CPU.

Run (from a checkout, after `pip install .`):
    python -m jaxcls.main --config configs/default.py --workdir runs/default

Data: the 10,000-image train / 2,000-image test sample of CIFAR-10 shipped in the package
(jaxcls/data/bundled); no download. Model: `cnn` at width 16 (about 0.4 M parameters),
15 epochs of batch 128 with SGD Nesterov, peak lr 0.2 after a 1-epoch warmup, cosine decay.
Expected: about 74% top-1 on the bundled test split, in 3.3 to 9.7 minutes on a 2-core CPU
(by the machine; first compilation included). Numbers measured are in benchmarks/README.md.
"""

from jaxcls.config import base_config


def get_config(arg: str = ""):
  del arg
  config = base_config()
  config.model.name = "cnn"
  config.model.width = 16
  config.batch_size = 128
  config.num_epochs = 15.0
  config.optim.learning_rate = 0.2
  config.optim.warmup_epochs = 1.0
  config.log_every_steps = 50
  config.eval_every_epochs = 5.0  # eval curve points at epochs 5 and 10, then the final eval
  return config
