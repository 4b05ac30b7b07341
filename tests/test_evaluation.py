"""Evaluation: one exact pass over a padded eval split, every example counted once; training
writes an eval file per evaluation."""

import json

import jax
import numpy as np
import pytest

from jaxcls import build, evaluation, metrics, sharding, steps
from jaxcls import config as config_lib
from jaxcls.data import pipeline, sources, transforms


def test_evaluate_counts_each_example_of_a_padded_split_once():
  """13 examples in eval batches of 8 on 8 devices: the second batch holds 3 padding
  examples, which must count nowhere (not in the metrics, not in the loss)."""
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
      steps.make_eval_step(config.data), state, state_shardings, mesh,
      build.batch_spec(mesh, config.eval_batch_size, config.data.image_size, with_mask=True))
  dataset = pipeline.create_eval_dataset(config.data, source, config.eval_batch_size,
                                         process_index=0, process_count=1)
  assert pipeline.num_eval_steps(13, 8) == 2

  result = evaluation.evaluate(eval_step, state, dataset, mesh, source.class_names)

  assert result["num_examples"] == 13 and sum(result["per_class"]["support"]) == 13
  assert np.sum(result["confusion_matrix"]) == 13
  # The same numbers as scoring the 13 examples directly, with no padding anywhere.
  logits = model.apply(variables, inputs, train=False)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  assert len(set(probs.argmax(1).tolist())) > 3  # the examples are told apart
  expected = metrics.classification_metrics(np.asarray(jax.nn.log_softmax(logits, axis=-1)),
                                             labels, source.class_names, (1, 5))
  assert result["confusion_matrix"] == expected["confusion_matrix"]
  assert result["per_class"]["support"] == expected["per_class"]["support"]
  for key in ("accuracy", "top5_accuracy", "f1_macro", "roc_auc_macro"):
    assert result[key] == pytest.approx(expected[key], rel=1e-5), key
  # The devices keep no scores after the pass: each batch's went to the host.
  outputs = eval_step(state, next(iter(pipeline.prefetch_to_device(
      dataset, sharding.batch_sharding(mesh)))))
  assert outputs["scores"].sharding.spec == sharding.batch_sharding(mesh).spec
  assert {s.data.shape for s in outputs["scores"].addressable_shards} == {(1, 10)}
  loss = -np.mean(np.log(probs[np.arange(13), labels]))
  assert result["loss"] == pytest.approx(loss, rel=1e-4)


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
