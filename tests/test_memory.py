"""Memory estimates from the config alone: the train state per device at each ZeRO stage,
and which parameters each stage splits."""

import jax
import pytest

from jaxcls import config as config_lib
from jaxcls import memory


def resnet18_on_fsdp8(stage):
  """ResNet-18 at 32x32 over fsdp=8 at a ZeRO stage (11M parameters: splitting shows)."""
  config = config_lib.base_config()
  config.model.name, config.model.stem, config.data.image_size = "resnet18", "small", 32
  config.mesh.data, config.mesh.fsdp, config.mesh.zero_stage = 1, 8, stage
  return config


def test_state_memory_per_device_shrinks_with_each_zero_stage():
  totals, parts = [], []
  for stage in (0, 1, 2, 3):
    parts.append(memory.state_memory(resnet18_on_fsdp8(stage)))
    totals.append(parts[-1]["total"])
  assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
  whole = parts[0]["params"]
  assert parts[0]["gradients"] == whole  # stage 0: nothing split
  assert parts[0]["optimizer"] == pytest.approx(whole)  # momentum (+ a step count)
  # Stage 3: the big kernels are split 8 ways; the small arrays that stay whole are < 1%.
  assert whole / 8 <= parts[3]["params"] < whole / 8 * 1.1
  assert parts[3]["num_params"] == 11_173_962


def test_parameter_layout_names_what_each_stage_splits():
  config = resnet18_on_fsdp8(3)
  layout = {name: (shape, spec) for name, shape, spec in memory.parameter_layout(config)}
  shape, spec = layout["stage4_block2/conv2/kernel"]
  assert shape == (3, 3, 512, 512) and "fsdp" in spec
  assert layout["head/bias"][1] == jax.sharding.PartitionSpec()  # small: stays whole
  config.mesh.zero_stage = 1  # parameters are not split below stage 3
  assert all(axis is None for _, _, spec in memory.parameter_layout(config) for axis in spec)


def test_step_memory_reads_xla_figures_for_the_compiled_step():
  """XLA's memory_analysis of the train step: the donated state is aliased, and stage 3
  holds an eighth of the parameters as arguments but gathers them into temporaries."""
  config = config_lib.base_config()
  config.model.update(dict(name="resnet_tiny", width=8))
  config.data.image_size, config.batch_size = 16, 16
  config.mesh.update(dict(data=1, fsdp=8, fsdp_min_size=256))
  figures = {}
  for stage in (0, 3):
    config.mesh.zero_stage = stage
    figures[stage] = memory.step_memory(config)
    state = memory.state_memory(config)
    batch = 16 * 16 * 16 * 3 / 8 + 16 * 4 / 8  # this device's uint8 images and int32 labels
    # Arguments: this device's train state (params, momentum, BatchNorm statistics, step) and
    # batch share; outputs: the new state (aliased to the donated one) and the metrics.
    state_mib = state["total"] - state["gradients"]
    assert figures[stage]["arguments"] == pytest.approx(state_mib + batch / memory.MIB,
                                                        rel=0.02)
    assert figures[stage]["aliased"] == pytest.approx(state_mib, rel=0.02)
    assert figures[stage]["peak"] == pytest.approx(
        figures[stage]["arguments"] + figures[stage]["outputs"]
        + figures[stage]["temporaries"] - figures[stage]["aliased"])
  assert figures[3]["arguments"] < 0.5 * figures[0]["arguments"]
