"""Input data: sources (sources.py; image_folder.py, tfds_source.py, records.py), decoding
(images.py), per-example transforms (transforms.py, augment.py), grain pipelines
(pipeline.py), skip_corrupt (corrupt.py), on-device mixup / cutmix (mixing.py), and the
ArrayRecord converter (`python -m jaxcls.data.convert`)."""

from jaxcls.data.pipeline import create_eval_dataset
from jaxcls.data.pipeline import create_train_dataset
from jaxcls.data.pipeline import make_global_batch
from jaxcls.data.pipeline import num_eval_steps
from jaxcls.data.pipeline import prefetch_to_device
from jaxcls.data.pipeline import steps_per_epoch
from jaxcls.data.sources import create_source
