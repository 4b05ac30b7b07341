"""Weight EMA: the average against a numpy reference (warmup included), laid out like the
parameters at every ZeRO stage, resumed bit for bit from a checkpoint; a run with it reports
ema_ (and tta_) metrics, exports the chosen weights and inference uses the ones asked for."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxcls import build, checkpoint, ema, evaluate, predict, sharding, steps
from jaxcls.errors import ConfigError
from helpers import (initial_state, model_and_optimizer, put_batch, synthetic_batches,
                     write_image, zero_config)
from runner import records, run_main


def ema_config(decay=0.2, stage=0, data=-1, fsdp=1):
  config = zero_config(stage=stage, data=data, fsdp=fsdp)
  config.ema.decay = decay
  return config


def start(config, devices=None):
  """(state, compiled train step, mesh): the session's seeded initial state with its average
  (no initializer to compile again), placed on config's mesh."""
  model, schedule, tx = model_and_optimizer("resnet_tiny")  # zero_config's, as ema_config's
  plain = initial_state("resnet_tiny")
  fields = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)}
  initial = steps.EmaTrainState(**fields, ema=jax.tree.map(
      np.copy, {"params": plain.params, "batch_stats": plain.batch_stats}))
  mesh = sharding.make_mesh(config.mesh, devices)
  abstract, shardings = build.abstract_train_state(model, tx, config, mesh)
  assert isinstance(abstract, steps.EmaTrainState)  # what a run with config.ema.decay builds
  state = jax.device_put(initial, shardings)
  return state, build.config_train_step(config, mesh, schedule, abstract, shardings), mesh


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_the_average_follows_a_numpy_reference_through_the_warmup():
  """decay 0.2 with warmup: the decays are 0.1, 2/11, then 0.2 (the cap)."""
  config = ema_config(decay=0.2, data=1)  # the average is the question: one device
  state, train_step, mesh = start(config, jax.devices()[:1])
  variables = host({"params": state.params, "batch_stats": state.batch_stats})
  expected = jax.tree.map(lambda x: x.astype(np.float64), variables)
  for n, batch in enumerate(synthetic_batches(config, 4)):
    state, _ = train_step(state, put_batch(batch, mesh))
    decay = min(0.2, (1 + n) / (10 + n))
    new = host({"params": state.params, "batch_stats": state.batch_stats})
    expected = jax.tree.map(lambda e, x, d=decay: d * e + (1 - d) * x, expected, new)
  got = host(state.ema)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7), got, expected)
  # It is an average, not a copy: it lags the trained weights.
  assert not np.allclose(got["params"]["head"]["kernel"], new["params"]["head"]["kernel"])


def test_decay_without_warmup_and_integer_leaves():
  config = ema_config(decay=0.9).ema
  config.warmup = False
  assert float(ema.decay_at(config, 0)) == pytest.approx(0.9)
  config.warmup = True
  assert float(ema.decay_at(config, 0)) == pytest.approx(0.1)
  assert float(ema.decay_at(config, 10_000)) == pytest.approx(0.9)
  average = {"params": {"w": np.ones(2, np.float32)}, "batch_stats": {"calls": np.int32(3)}}
  new = ema.update(average, {"w": np.zeros(2, np.float32)}, {"calls": np.int32(4)},
                   ema.decay_at(config, 0))
  np.testing.assert_allclose(new["params"]["w"], [0.1, 0.1], rtol=1e-6)
  assert int(new["batch_stats"]["calls"]) == 4  # a counter is copied, not averaged


def test_off_by_default_the_state_is_the_plain_train_state():
  config = zero_config()
  assert config.ema.decay == 0 and not ema.enabled(config)
  shapes = build.state_shapes(build.create_model(config), build.create_optimizer(config)[1],
                              config)
  assert type(shapes) is steps.TrainState  # pylint: disable=unidiomatic-typecheck
  with pytest.raises(ConfigError, match="kept no EMA"):
    ema.weights_for(shapes, "ema")
  assert ema.weights_for(shapes, "raw") is shapes


@pytest.mark.parametrize("stage", [1, 3])
def test_the_average_is_laid_out_like_the_parameters(stage):
  """On (data=4, fsdp=2): at stage 3 the average is split over fsdp as the parameters are."""
  config = ema_config(stage=stage, data=4, fsdp=2)
  state, train_step, mesh = start(config)
  state, _ = train_step(state, put_batch(synthetic_batches(config, 1)[0], mesh))
  for tree in ("params", "batch_stats"):
    for average, value in zip(jax.tree.leaves(state.ema[tree]),
                              jax.tree.leaves(getattr(state, tree)), strict=True):
      assert average.sharding == value.sharding
  split = [leaf for leaf in jax.tree.leaves(state.ema) if "fsdp" in leaf.sharding.spec]
  assert bool(split) == (stage == 3)


def test_a_resumed_run_continues_the_average_bit_for_bit(tmp_path):
  """4 steps uninterrupted vs 2, a save and a restore into a fresh process's shapes, 2 more."""
  config = ema_config(decay=0.5, data=1)
  batches = synthetic_batches(config, 4)
  state, train_step, mesh = start(config, jax.devices()[:1])
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=leaf.sharding), state)
  first = jax.device_get(state)
  for batch in batches:
    state, _ = train_step(state, put_batch(batch, mesh))
  uninterrupted = host(state)

  state = jax.device_put(first, jax.tree.map(lambda leaf: leaf.sharding, abstract))
  for batch in batches[:2]:
    state, _ = train_step(state, put_batch(batch, mesh))
  saver = checkpoint.Checkpointer(str(tmp_path), config.checkpoint, 1,
                                  checkpoint.run_metadata(config))
  saver.manager.save(2, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardSave(state)))
  saver.close()
  loader = checkpoint.Checkpointer(str(tmp_path), config.checkpoint, 1,
                                   checkpoint.run_metadata(config))
  state = loader.restore(2, abstract)
  loader.close()
  assert isinstance(state, steps.EmaTrainState)
  for batch in batches[2:]:
    state, _ = train_step(state, put_batch(batch, mesh))
  for got, want in zip(jax.tree.leaves(host(state)), jax.tree.leaves(uninterrupted),
                       strict=True):
    np.testing.assert_array_equal(got, want)


def test_a_checkpoint_refuses_a_config_that_turns_the_average_on_or_off(tmp_path):
  saved = checkpoint.run_metadata(zero_config())
  assert saved["ema.decay > 0"] is False
  loader = checkpoint.Checkpointer(str(tmp_path), zero_config().checkpoint, 1,
                                   checkpoint.run_metadata(ema_config()))
  try:
    with pytest.raises(checkpoint.CheckpointError, match=r"config.ema.decay > 0: checkpoint "
                       "False, now True"):
      loader.check_compatible(1, {k: v for k, v in saved.items() if k != "ema.decay > 0"})
  finally:
    loader.close()


def test_a_run_with_ema_and_tta_reports_both_exports_the_average_and_inference_chooses(
    tmp_path):
  workdir = tmp_path / "run"
  result = run_main(workdir, "--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
                    "--config.num_train_steps=6", "--config.batch_size=64",
                    "--config.eval_every_epochs=0.1", "--config.ema.decay=0.5",
                    "--config.log_every_steps=3", "--config.eval_tta=flip")
  assert result.returncode == 0, result.stderr[-3000:]
  final = json.loads((workdir / "eval" / "test_6.json").read_text())
  assert final["ema_num_examples"] == final["num_examples"] == 2000
  assert sum(final["ema_per_class"]["support"]) == 2000
  assert final["ema_loss"] != final["loss"]
  assert final["ema_tta_num_examples"] == final["tta_num_examples"] == 2000
  evals = records(workdir, "eval")
  assert evals and all({"accuracy", "ema_accuracy", "tta_accuracy", "ema_tta_accuracy"} <= set(r)
                       for r in evals)
  assert "ema_accuracy" in result.stdout and "tta_accuracy" in result.stdout

  exported, info = checkpoint.load_export(str(workdir / "export"))
  assert info["weights"] == "ema"
  parts = build.restore_for_inference(str(workdir))
  jax.tree.map(np.testing.assert_array_equal, exported,
               host({"params": parts.state.ema["params"],
                     "batch_stats": parts.state.ema["batch_stats"]}))

  for weights, prefix, tta in (("ema", "ema_", None), ("raw", "", "none")):
    again = evaluate.run(str(workdir), weights=weights, tta=tta)
    assert again["weights"] == weights
    assert again["confusion_matrix"] == final[prefix + "confusion_matrix"], weights
    assert again["loss"] == pytest.approx(final[prefix + "loss"], rel=1e-5)
    if tta is None:  # the run's config.eval_tta
      assert again["tta_confusion_matrix"] == final[prefix + "tta_confusion_matrix"]
    else:
      assert not any(key.startswith("tta_") for key in again)
  write_image(tmp_path / "a.png", 3, size=(32, 32))
  by_weights = {weights: predict.predict(str(workdir), [str(tmp_path / "a.png")],
                                         weights=weights)[0]["top_k"]
                for weights in (None, "ema", "raw")}
  assert by_weights[None] == by_weights["ema"] != by_weights["raw"]
