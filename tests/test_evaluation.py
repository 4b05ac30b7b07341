"""Evaluation: one exact pass over a padded eval split, every example counted once; training
writes an eval file per evaluation."""

import functools
import json
import types

import grain
import jax
import numpy as np
import pytest

from jaxcls import build, evaluation, metrics, sharding, steps
from jaxcls import config as config_lib
from jaxcls.data import pipeline, sources, transforms


@functools.cache
def padded_split(tta="none"):
  """13 examples in eval batches of 8 on 8 devices (the second batch holds 3 padding
  examples), a model with random weights, and its compiled eval step."""
  config = config_lib.base_config()
  config.model.update(dict(name="cnn", width=4, bn_momentum=0.0))
  config.data.update(dict(source="synthetic", synthetic_size=13, image_size=8, eval_resize=8,
                          num_workers=0))
  config.eval_batch_size = 8
  mesh = sharding.make_mesh(config.mesh)
  assert sharding.num_batch_shards(mesh) == 8
  source = sources.create_source(config.data, "test")
  examples = []
  for i in range(13):  # what the eval pipeline makes of each example, before batching
    element = source[i]
    for t in transforms.eval_transforms(config.data):
      element = t.map(element)
    examples.append(element)
  images = np.stack([e["image"] for e in examples])
  labels = np.array([e["label"] for e in examples])
  inputs = steps.normalize(images, config.data.mean, config.data.std)

  model = build.create_model(config)
  _, tx = build.create_optimizer(config)
  abstract_state, state_shardings = build.abstract_train_state(model, tx, config, mesh)
  # A model that tells the examples apart (a fresh head is zero and scores every example
  # alike): random weights, and the BatchNorm statistics of these 13 (momentum 0 keeps one
  # batch's). Made on the host: no initializer to compile.
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: rng.normal(0, 1, a.shape).astype(a.dtype), abstract_state)
  _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      {"params": state.params, "batch_stats": state.batch_stats}, inputs)
  variables = {"params": state.params, "batch_stats": updated["batch_stats"]}
  state = jax.device_put(state.replace(batch_stats=updated["batch_stats"]), state_shardings)
  eval_step = build.compile_eval_step(
      steps.make_eval_step(config.data, tta), state, state_shardings, mesh,
      build.batch_spec(mesh, config.eval_batch_size, config.data.image_size, with_mask=True))
  dataset = pipeline.create_eval_dataset(config.data, source, config.eval_batch_size,
                                         process_index=0, process_count=1)
  assert pipeline.num_eval_steps(13, 8) == 2
  return types.SimpleNamespace(config=config, mesh=mesh, source=source, images=images,
                               labels=labels, inputs=inputs, model=model, variables=variables,
                               state=state, eval_step=eval_step, dataset=dataset)


def test_evaluate_counts_each_example_of_a_padded_split_once():
  """The 3 padding examples must count nowhere (not in the metrics, not in the loss)."""
  split = padded_split()
  mesh, source, labels, eval_step, state = (split.mesh, split.source, split.labels,
                                            split.eval_step, split.state)
  result = evaluation.evaluate(eval_step, state, split.dataset, mesh, source.class_names)

  assert result["num_examples"] == 13 and sum(result["per_class"]["support"]) == 13
  assert np.sum(result["confusion_matrix"]) == 13
  # The same numbers as scoring the 13 examples directly, with no padding anywhere.
  logits = split.model.apply(split.variables, split.inputs, train=False)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  assert len(set(probs.argmax(1).tolist())) > 3  # the examples are told apart
  expected = metrics.classification_metrics(np.asarray(jax.nn.log_softmax(logits, axis=-1)),
                                             labels, source.class_names, (1, 5))
  assert_same_metrics(result, expected)
  assert not any(key.startswith("tta_") for key in result)  # config.eval_tta='none'
  # The devices keep no scores after the pass: each batch's went to the host.
  outputs = eval_step(state, next(iter(pipeline.prefetch_to_device(
      split.dataset, sharding.batch_sharding(mesh)))))
  assert outputs["scores"].sharding.spec == sharding.batch_sharding(mesh).spec
  assert {s.data.shape for s in outputs["scores"].addressable_shards} == {(1, 10)}
  loss = -np.mean(np.log(probs[np.arange(13), labels]))
  assert result["loss"] == pytest.approx(loss, rel=1e-4)


def assert_same_metrics(result, expected, prefix=""):
  assert result[prefix + "confusion_matrix"] == expected["confusion_matrix"]
  assert result[prefix + "per_class"]["support"] == expected["per_class"]["support"]
  for key in ("accuracy", "top5_accuracy", "f1_macro", "roc_auc_macro"):
    assert result[prefix + key] == pytest.approx(expected[key], rel=1e-5), prefix + key


def test_flip_tta_averages_each_example_with_its_mirror_once_on_a_padded_split():
  split = padded_split("flip")
  result = evaluation.evaluate(split.eval_step, split.state, split.dataset, split.mesh,
                               split.source.class_names)
  assert result["tta_num_examples"] == result["num_examples"] == 13
  assert np.sum(result["tta_confusion_matrix"]) == 13

  def probabilities(inputs):
    return np.asarray(jax.nn.softmax(split.model.apply(split.variables, inputs, train=False)),
                      np.float64)

  plain = probabilities(split.inputs)
  averaged = (plain + probabilities(split.inputs[:, :, ::-1])) / 2
  names = split.source.class_names
  assert_same_metrics(result, metrics.classification_metrics(np.log(plain), split.labels,
                                                             names, (1, 5)))
  assert_same_metrics(result, metrics.classification_metrics(np.log(averaged), split.labels,
                                                             names, (1, 5)), prefix="tta_")
  tta_loss = -np.mean(np.log(averaged[np.arange(13), split.labels]))
  assert result["tta_loss"] == pytest.approx(tta_loss, rel=1e-4)
  assert abs(result["tta_loss"] - result["loss"]) > 1e-3  # the mirror images score otherwise


def test_flip_shift_tta_weights_eight_views_of_each_example_once_on_a_padded_split():
  split = padded_split("flip_shift")
  result = evaluation.evaluate(split.eval_step, split.state, split.dataset, split.mesh,
                               split.source.class_names)
  assert result["tta_num_examples"] == result["num_examples"] == 13

  def probabilities(inputs):
    return np.asarray(jax.nn.softmax(split.model.apply(split.variables, inputs, train=False)),
                      np.float64)

  # By hand: a one-pixel shift down-right and up-left with reflected edges, and mirrors.
  x = np.asarray(split.inputs)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  down_right, up_left = padded[:, :-2, :-2], padded[:, 2:, 2:]
  assert np.array_equal(down_right[:, 1:, 1:], x[:, :-1, :-1])
  averaged = (probabilities(x) + probabilities(x[:, :, ::-1])) / 4 + sum(
      probabilities(v) + probabilities(v[:, :, ::-1]) for v in (down_right, up_left)) / 8
  assert_same_metrics(result, metrics.classification_metrics(
      np.log(averaged), split.labels, split.source.class_names, (1, 5)), prefix="tta_")
  tta_loss = -np.mean(np.log(averaged[np.arange(13), split.labels]))
  assert result["tta_loss"] == pytest.approx(tta_loss, rel=1e-4)


def test_flip_tta_of_mirror_symmetric_images_is_the_plain_evaluation():
  split = padded_split("flip")
  half = split.images[:, :, :4]
  symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
  assert np.array_equal(symmetric, symmetric[:, :, ::-1])
  padded = np.concatenate([symmetric, np.zeros((3, 8, 8, 3), np.uint8)])
  batches = [{"image": padded[i:i + 8], "label": np.resize(split.labels, 16)[i:i + 8].astype(
      np.int32), "mask": np.arange(i, i + 8) < 13} for i in (0, 8)]
  result = evaluation.evaluate(split.eval_step, split.state,
                               grain.MapDataset.source(batches).to_iter_dataset(), split.mesh,
                               split.source.class_names)
  assert result["num_examples"] == result["tta_num_examples"] == 13
  for key in ("confusion_matrix", "accuracy", "top5_accuracy"):
    assert result["tta_" + key] == result[key], key
  for key in ("support", "precision", "recall"):
    assert result["tta_per_class"][key] == result["per_class"][key], key
  assert result["tta_loss"] == pytest.approx(result["loss"], rel=1e-6)
  assert result["tta_roc_auc_macro"] == pytest.approx(result["roc_auc_macro"], rel=1e-6)


def test_training_writes_an_eval_file_per_evaluation(trained_workdir):
  final = json.loads((trained_workdir / "eval" / "test_6.json").read_text())
  assert final["num_examples"] == 2000 and sum(final["per_class"]["support"]) == 2000
  assert np.sum(final["confusion_matrix"]) == 2000
  assert len(list((trained_workdir / "eval").glob("test_*.json"))) >= 2  # periodic evals too


def test_eval_scores_are_log_probabilities_that_keep_confident_examples_apart():
  """A float32 softmax rounds both of these to probability 1.0 for class 0 (a tie that
  would change ROC-AUC); their log-probabilities differ."""
  config = config_lib.base_config()
  logits = np.array([[30.0, 0.0, 0.0], [40.0, 0.0, 0.0], [0.0, 1.0, 2.0]], np.float32)

  class Fixed:  # a state whose model returns these logits
    params, batch_stats = {}, {}

    @staticmethod
    def apply_fn(variables, images, train):
      del variables, images, train
      return logits

  config.data.num_classes = 3
  batch = {"image": np.zeros((3, 4, 4, 3), np.uint8), "label": np.array([0, 1, 2]),
           "mask": np.ones(3, bool)}
  scores = np.asarray(steps.make_eval_step(config.data)(Fixed, batch)["scores"])
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  assert probs[0, 0] == probs[1, 0] == 1.0  # tied as probabilities
  assert scores[0, 1] != scores[1, 1]  # apart as log-probabilities
  np.testing.assert_allclose(np.exp(scores).sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(scores, jax.nn.log_softmax(logits.astype(np.float64)), rtol=1e-5)
