"""Input data: sources (sources.py), per-example transforms (transforms.py), grain pipelines
(pipeline.py)."""

from jaxcls.data.pipeline import create_eval_dataset
from jaxcls.data.pipeline import create_train_dataset
from jaxcls.data.pipeline import make_global_batch
from jaxcls.data.pipeline import num_eval_steps
from jaxcls.data.pipeline import prefetch_to_device
from jaxcls.data.pipeline import steps_per_epoch
from jaxcls.data.sources import create_source
