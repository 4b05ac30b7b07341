"""How much memory one device needs under a config's mesh and ZeRO stage.

`state_memory`: the train state at rest, from shapes and shardings alone (jax.eval_shape:
nothing is allocated), so it answers "which stage fits?" before a run starts, for any model
on the devices at hand; activations are not included. `step_memory`: XLA's own figures for
the compiled train step (`compiled.memory_analysis()`): its arguments, outputs and
temporaries (activations, gradients, collective buffers) per device, and the peak.
"""

import jax

from jaxcls import build, sharding

MIB = 2**20


def _abstract_state(config):
  _, tx = build.create_optimizer(config)
  return build.state_shapes(build.create_model(config), tx, config)


def state_memory(config, mesh=None) -> dict:
  """MiB per device of params, optimizer state, gradients and BatchNorm stats, and the total.

  Gradients are counted in the layout the train step constrains them to before the update.
  Also returns `num_params`. `mesh` defaults to the one config.mesh describes.
  """
  abstract = _abstract_state(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  layout = sharding.Layout(mesh, config.mesh)
  shardings = layout.state_shardings(abstract)
  per_device = sharding.bytes_per_device_from_shardings
  parts = {
      "params": per_device(abstract.params, shardings.params),
      "optimizer": per_device(abstract.opt_state, shardings.opt_state),
      "gradients": per_device(abstract.params, layout.grad_shardings(abstract.params)),
      "batch_stats": per_device(abstract.batch_stats, shardings.batch_stats),
  }
  parts["total"] = sum(parts.values())
  result = {k: v / MIB for k, v in parts.items()}
  result["num_params"] = sum(leaf.size for leaf in jax.tree.leaves(abstract.params))
  return result


def parameter_layout(config, mesh=None) -> list[tuple[str, tuple, jax.sharding.PartitionSpec]]:
  """[(parameter name, shape, PartitionSpec)] under config.mesh: what is split over which axis.

  Names are the ones config.mesh.rules match, e.g. `stage2_block1/conv1/kernel`.
  """
  abstract = _abstract_state(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  shardings = sharding.Layout(mesh, config.mesh).state_shardings(abstract).params
  leaves = jax.tree_util.tree_leaves_with_path(abstract.params)
  return [(sharding.path_name(path), tuple(leaf.shape), leaf_sharding.spec)
          for (path, leaf), leaf_sharding in zip(leaves, jax.tree.leaves(shardings))]


def compiled_memory(compiled) -> dict:
  """MiB per device of a compiled step, from XLA's memory_analysis(): arguments, outputs,
  temporaries, aliased (donated inputs reused as outputs) and the peak.

  The peak is arguments + outputs + temporaries - aliased: every buffer of one call live at
  once (an upper bound). XLA's own `peak_memory_in_bytes` is not used: XLA:CPU reports the
  arguments alone there.
  """
  stats = compiled.memory_analysis()
  parts = {
      "arguments": stats.argument_size_in_bytes,
      "outputs": stats.output_size_in_bytes,
      "temporaries": stats.temp_size_in_bytes,
      "aliased": stats.alias_size_in_bytes,
  }
  parts["peak"] = (parts["arguments"] + parts["outputs"] + parts["temporaries"]
                   - parts["aliased"])
  return {k: v / MIB for k, v in parts.items()}


def step_memory(config, mesh=None) -> dict:
  """compiled_memory of config's train step on its mesh (compiled here: seconds to minutes)."""
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  model = build.create_model(config)
  schedule, tx = build.create_optimizer(config)
  abstract_state, state_shardings = build.abstract_train_state(model, tx, config, mesh)
  train_step = build.config_train_step(config, mesh, schedule, abstract_state, state_shardings)
  return compiled_memory(train_step)
