"""Default config: a small ResNet on the bundled CIFAR-10 sample, sized for a 2-core CPU.

Run:
    python -m jaxcls.main --config configs/default.py --workdir runs/default

Expected: (filled in after tuning)
"""

from jaxcls.config import base_config


def get_config(arg: str = ""):
  del arg
  config = base_config()
  return config
