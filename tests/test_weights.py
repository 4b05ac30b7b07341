"""Pretrained weights in and out: torchvision / timm state dicts give PyTorch's outputs (the
fixtures of scripts/make_weight_fixtures.py, no torch needed), exports load into torchvision,
and training starts from them (`config.model.init_from`, `optim.freeze`, `backbone_lr_scale`)."""

import functools
import json
import sys
import types

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from jaxcls import build, checkpoint, models, sharding, steps, weights
from jaxcls import config as config_lib
from jaxcls.errors import ConfigError, WeightsError
from jaxcls.models import resnet
from helpers import put_batch, synthetic_batches, tiny_config
from runner import REPO, run_main, run_tool

FIXTURES = REPO / "tests" / "fixtures"


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def fixture(name):
  """(state dict, the PyTorch inputs and outputs saved with it)."""
  return (weights.read_state_dict(str(FIXTURES / f"{name}.safetensors")),
          dict(np.load(FIXTURES / f"{name}.npz")))


def variables_under(flat, module):
  """{"params", "batch_stats"} of one module of a converted state dict."""
  tree = flax.traverse_util.unflatten_dict(flat)
  return {collection: tree[collection][module] for collection in ("params", "batch_stats")
          if module in tree.get(collection, {})}


def test_torchvision_pieces_give_pytorchs_outputs():
  state, io = fixture("torchvision_pieces")
  flat, leftover = weights.from_torch(state)
  assert leftover == []  # num_batches_tracked is read and dropped, not left over

  def stem(x):
    # The model's own conv and BatchNorm (read as an intermediate), then ReLU and the 3x3/2
    # max-pool; the timm tests below run the whole network, pooling included.
    model = resnet.ResNet(stage_sizes=(), width=8, stem="imagenet", num_classes=1)
    tree = flax.traverse_util.unflatten_dict(flat)
    variables = {"params": {"stem_conv": tree["params"]["stem_conv"],
                            "stem_bn": tree["params"]["stem_bn"],
                            "head": {"kernel": np.zeros((8, 1)), "bias": np.zeros(1)}},
                 "batch_stats": {"stem_bn": tree["batch_stats"]["stem_bn"]}}
    _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    bn = state["intermediates"]["stem_bn"]["__call__"][0]
    return nn.max_pool(nn.relu(bn), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  outputs = {
      "stem": stem(nhwc(io["stem_in"])),
      "basic": resnet.BasicBlock(features=16, strides=2).apply(
          variables_under(flat, "stage2_block1"), nhwc(io["basic_in"]), train=False),
      "bottleneck": resnet.BottleneckBlock(features=8, strides=2).apply(
          variables_under(flat, "stage3_block1"), nhwc(io["bottleneck_in"]), train=False),
  }
  for piece, output in outputs.items():
    np.testing.assert_allclose(output, nhwc(io[f"{piece}_out"]), atol=1e-5, err_msg=piece)
  head = nn.Dense(10).apply(variables_under(flat, "head"), io["head_in"].mean(axis=(2, 3)))
  np.testing.assert_allclose(head, io["head_out"], atol=1e-5)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_timm_resnets_give_pytorchs_logits(block):
  """Whole timm networks (stem, four stages, projections with stride 2, head): the mapping
  finds every key, infers stem, width and classes, and the logits agree."""
  state, io = fixture(f"timm_{block}")
  block_cls = {"basic": resnet.BasicBlock, "bottleneck": resnet.BottleneckBlock}[block]
  architecture = functools.partial(resnet.ResNet, stage_sizes=(1, 1, 1, 1), block_cls=block_cls)
  flat, leftover = weights.from_torch(state)
  settings = weights.check_complete(flat, leftover, f"timm {block}", "fixture", architecture)
  assert settings == {"stem": "imagenet", "width": 4, "num_classes": 5}
  model = architecture(**settings)
  logits = model.apply(flax.traverse_util.unflatten_dict(flat), nhwc(io["input"]), train=False)
  np.testing.assert_allclose(logits, io["logits"], atol=1e-5)


def test_timm_round_trip_gives_back_the_same_tensors():
  state, _ = fixture("timm_bottleneck")
  flat, _ = weights.from_torch(state)
  back = weights.to_torch(flax.traverse_util.unflatten_dict(flat), step=123)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_exports_have_torchvisions_keys_and_shapes(name):
  """What torchvision's load_state_dict(strict=True) asks: every key, no other, each shape."""
  wanted = json.loads((FIXTURES / "torchvision_keys.json").read_text())[name]
  shapes = weights.expected_shapes(models.MODELS[name],
                                   {"num_classes": 1000, "width": 64, "stem": "imagenet"})
  variables = flax.traverse_util.unflatten_dict({k: np.zeros(s) for k, s in shapes.items()})
  exported = weights.to_torch(variables)
  assert {k: list(v.shape) for k, v in exported.items()} == wanted
  assert exported["bn1.num_batches_tracked"].dtype == np.int64


def random_variables(name="resnet18", num_classes=7, width=8, stem="imagenet", seed=0):
  """A jaxcls model's variables with every value random (a zero head would hide a swap)."""
  shapes = weights.expected_shapes(models.MODELS[name],
                                   {"num_classes": num_classes, "width": width, "stem": stem})
  rng = np.random.default_rng(seed)
  return {k: (rng.uniform(0.5, 1.5, s) if k[-1] == "var" else rng.normal(size=s))
          .astype(np.float32) for k, s in shapes.items()}


def write_torch_file(path, flat, drop=(), extra=None):
  state = weights.to_torch(flax.traverse_util.unflatten_dict(flat))
  state = {k: v for k, v in state.items() if k not in drop} | (extra or {})
  weights.write_state_dict(state, str(path))
  return path


def test_import_and_export_commands_round_trip(tmp_path):
  flat = random_variables()
  src = write_torch_file(tmp_path / "resnet18.safetensors", flat)
  result = run_tool("jaxcls.weights", "import", src, "--model", "resnet18",
                    "--out", tmp_path / "imported")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resnet18, stem 'imagenet', width 8, 7 classes" in result.stdout
  variables, info = checkpoint.load_export(str(tmp_path / "imported"))
  assert info["model"] == {"name": "resnet18", "stem": "imagenet", "width": 8}
  assert (info["num_classes"], info["mean"]) == (7, list(weights.IMAGENET_MEAN))
  for key, value in flax.traverse_util.flatten_dict(variables).items():
    np.testing.assert_array_equal(value, flat[key])
  result = run_tool("jaxcls.weights", "export", "--workdir", tmp_path / "imported",
                    "--out", tmp_path / "back.safetensors")
  assert result.returncode == 0, result.stderr[-2000:]
  original = weights.read_state_dict(str(src))
  back = st_numpy.load_file(str(tmp_path / "back.safetensors"))
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_import_names_what_does_not_fit(tmp_path, monkeypatch):
  flat = random_variables()

  def message(path, model="resnet18"):
    with pytest.raises(WeightsError) as e:
      weights.import_weights(str(path), model, str(tmp_path / "out"))
    return str(e.value)

  assert "keys a resnet18 needs are missing: layer1.0.bn1.running_var." in message(
      write_torch_file(tmp_path / "a.safetensors", flat, drop=["layer1.0.bn1.running_var"]))
  assert "has no place for: layer1.0.se.fc1.weight." in message(write_torch_file(
      tmp_path / "b.safetensors", flat, extra={"layer1.0.se.fc1.weight": np.ones((2, 8, 1, 1))}))
  assert "keys a resnet34 needs are missing: layer1.2.bn1.bias" in message(
      write_torch_file(tmp_path / "c.safetensors", flat), "resnet34")
  wrong = dict(flat)
  wrong[("params", "stage2_block1", "conv1", "kernel")] = np.zeros((3, 3, 8, 9), np.float32)
  assert "layer2.0.conv1.weight has shape (3, 3, 8, 9)" in message(
      write_torch_file(tmp_path / "d.safetensors", wrong))
  (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
  assert "not a readable safetensors file" in message(tmp_path / "bad.safetensors")
  (tmp_path / "weights.pth").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  assert "needs PyTorch (pip install torch)" in message(tmp_path / "weights.pth")
  assert "convert it to safetensors" in message(tmp_path / "weights.pth")
  result = run_tool("jaxcls.weights", "import", tmp_path / "a.safetensors", "--model",
                    "resnet18", "--out", tmp_path / "out")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "layer1.0.bn1.running_var" in result.stderr


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_full_resnets_match_torchvision(name, tmp_path):
  """With torch installed: torchvision's model -> import -> the same logits at 224px; the
  export loads into torchvision with strict=True and gives them back. Skipped (and listed as
  skipped) without torch; the fixture tests above cover every mapping without it."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(0)
  model = getattr(torchvision.models, name)()
  with torch.no_grad():
    for norm in model.modules():  # statistics as after training, not the defaults 0 and 1
      if isinstance(norm, torch.nn.BatchNorm2d):
        norm.momentum = None
    model.train()
    model(torch.randn(8, 3, 224, 224, generator=generator))
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=generator)
    expected = model(x).numpy()
  torch.save(model.state_dict(), tmp_path / "weights.pth")
  st_torch.save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
  weights.import_weights(str(tmp_path / "weights.safetensors"), name, str(tmp_path / name))
  weights.import_weights(str(tmp_path / "weights.pth"), name, str(tmp_path / "from_pth"))
  variables, _ = checkpoint.load_export(str(tmp_path / name))
  jax.tree.map(np.testing.assert_array_equal, variables,
               checkpoint.load_export(str(tmp_path / "from_pth"))[0])
  logits = models.MODELS[name]().apply(variables, nhwc(x.numpy()), train=False)
  np.testing.assert_allclose(logits, expected, atol=1e-4)
  weights.export_weights(str(tmp_path / name), str(tmp_path / "back.safetensors"))
  again = getattr(torchvision.models, name)()
  again.load_state_dict(st_torch.load_file(str(tmp_path / "back.safetensors")), strict=True)
  with torch.no_grad():
    np.testing.assert_array_equal(again.eval()(x).numpy(), expected)


# Starting a run from weights: config.model.init_from, optim.freeze, optim.backbone_lr_scale.


def start(config, mesh_shape=None):
  """(state, compiled train step, log lines) for config on the fake devices."""
  mesh = sharding.make_mesh(config.mesh)
  model = build.create_model(config)
  schedule, tx = build.create_optimizer(config, 10, 10)
  lines = []
  state, shardings = build.create_train_state(model, tx, config, mesh, lines.append)
  step = build.compile_train_step(steps.make_train_step(config.data, config.optim, schedule),
                                  state, shardings, mesh, config)
  return state, lambda s, batch: step(s, put_batch(batch, mesh)), lines


def test_init_from_a_1000_class_file_reinitializes_the_head_and_trains(tmp_path):
  flat = random_variables("resnet_tiny", num_classes=1000, stem="small")
  config = tiny_config(fsdp=2)  # kernels split over fsdp: each placed shard by shard
  config.model.init_from = str(write_torch_file(tmp_path / "in1k.safetensors", flat))
  state, train_step, lines = start(config)
  assert any("init_from: head re-initialized: 1000 classes" in line and
             "10 in config.data.num_classes" in line for line in lines), lines
  loaded = flax.traverse_util.flatten_dict(
      jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
  for key, value in loaded.items():
    if key[1] == "head":  # the model's own initializer: zeros
      assert not value.any() and value.shape[-1] == 10
    else:
      np.testing.assert_array_equal(value, flat[key], err_msg=str(key))
  losses = []
  for batch in synthetic_batches(config, 3):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  assert jax.device_get(state.params["head"]["kernel"]).any()  # the new head learns


def test_init_from_mismatches_name_the_parameter(tmp_path):
  config = tiny_config()
  config.model.init_from = str(write_torch_file(
      tmp_path / "wide.safetensors", random_variables("resnet_tiny", 10, width=16, stem="small")))
  with pytest.raises(ConfigError, match=r"init_from=.*: params/stem_conv/kernel has shape "
                                        r"\(3, 3, 3, 16\) there, \(3, 3, 3, 8\) in this model "
                                        r"\(its last size is config.model.width"):
    start(config)
  config.model.init_from = str(write_torch_file(
      tmp_path / "r18.safetensors", random_variables("resnet18", 10, stem="small")))
  with pytest.raises(ConfigError, match=r"does not fit config.model.name='resnet_tiny': not in "
                                        r"the model: batch_stats/stage1_block2/bn1/mean"):
    start(config)
  config.model.init_from = str(tmp_path / "missing.safetensors")
  with pytest.raises(ConfigError, match=r"config.model.init_from=.*missing.safetensors.*: no "
                                        "such file"):
    models.check_init_from(config.model)
  config.model.init_from = str(tmp_path)
  with pytest.raises(ConfigError, match="a directory without a jaxcls export"):
    models.check_init_from(config.model)
  config.model.init_from = str(tmp_path / "weights.pth")
  with pytest.raises(ConfigError, match="convert a .pth once with `python -m jaxcls.weights"):
    models.check_init_from(config.model)


def first_update(config, batch):
  state, train_step, _ = start(config)
  before = jax.device_get(state.params)
  after = jax.device_get(train_step(state, batch)[0].params)
  return jax.tree.map(lambda a, b: a - b, after, before)


def test_freeze_and_backbone_lr_scale(tmp_path):
  config = tiny_config()
  config.optim.schedule = "constant"
  # Random weights everywhere (a fresh head is zeros, which would stop every other gradient).
  config.model.init_from = str(write_torch_file(
      tmp_path / "tiny.safetensors", random_variables("resnet_tiny", 10, stem="small")))
  batch = synthetic_batches(config, 1)[0]
  plain = first_update(config, batch)
  config.optim.freeze = "^stem_"
  config.optim.backbone_lr_scale = 0.1
  tuned = first_update(config, batch)
  # float32 differences of params near 1: about 1e-7 of rounding (hence atol)
  for path, update in flax.traverse_util.flatten_dict(tuned, sep="/").items():
    reference = flax.traverse_util.flatten_dict(plain, sep="/")[path]
    assert np.abs(reference).max() > 0, path
    if path.startswith("stem_"):
      assert not update.any(), path  # frozen: not even weight decay moves it
    elif path.startswith("head/"):
      np.testing.assert_allclose(update, reference, rtol=1e-5, atol=2e-7, err_msg=path)
    else:
      np.testing.assert_allclose(update, 0.1 * reference, rtol=1e-4, atol=2e-7, err_msg=path)


@pytest.mark.parametrize("key,value,message", [
    ("freeze", "stage(", r"config.optim.freeze='stage\(' is not a regular expression"),
    ("head_params", "[", r"config.optim.head_params='\[' is not a regular expression"),
    ("backbone_lr_scale", 2.0, r"config.optim.backbone_lr_scale=2.0 must be in \[0.0, 1.0\]"),
])
def test_bad_fine_tuning_settings_name_the_key(key, value, message):
  config = tiny_config()
  config.optim[key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.check_config(config, jax.device_count())


def test_a_freeze_that_matches_nothing_is_an_error():
  config = tiny_config()
  config.optim.freeze = "^layer1"  # torch's name, not jaxcls's
  with pytest.raises(ConfigError, match=r"freeze='\^layer1' matches no parameter; their names "
                                        "look like stem_conv/kernel"):
    start(config)


@pytest.mark.slow
def test_a_run_exported_to_torchvision_and_back_starts_a_new_run(trained_workdir, tmp_path):
  """The user's path: a run's weights -> torchvision .safetensors -> `import` -> a new run
  with init_from; run again, the new run's own checkpoint wins over init_from."""
  result = run_tool("jaxcls.weights", "export", "--workdir", trained_workdir,
                    "--out", tmp_path / "run.safetensors")
  assert result.returncode == 0, result.stderr[-2000:]
  result = run_tool("jaxcls.weights", "import", tmp_path / "run.safetensors", "--model",
                    "resnet_tiny", "--out", tmp_path / "imported")
  assert result.returncode == 0, result.stderr[-2000:]
  imported, _ = checkpoint.load_export(str(tmp_path / "imported"))
  jax.tree.map(np.testing.assert_array_equal, imported,
               checkpoint.load_export(str(trained_workdir / "export"))[0])
  run = ("--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8", "--config.batch_size=64",
         f"--config.model.init_from={tmp_path / 'imported'}", "--config.optim.freeze=^stem_")
  result = run_main(tmp_path / "finetune", *run, "--config.num_train_steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Started from the weights in {tmp_path / 'imported'}" in result.stdout
  assert "head re-initialized" not in result.stdout  # 10 classes in both
  tuned, _ = checkpoint.load_export(str(tmp_path / "finetune" / "export"))
  np.testing.assert_array_equal(tuned["params"]["stem_conv"]["kernel"],
                                imported["params"]["stem_conv"]["kernel"])  # frozen
  result = run_main(tmp_path / "finetune", *run, "--config.num_train_steps=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from" in result.stdout and "Started from the weights" not in result.stdout


def test_init_from_a_cnn_export_refuses_the_other_downsample_layout(tmp_path):
  """Both cnn layouts have the same arrays: the export's config, not a shape, tells them apart."""
  config = tiny_config()
  config.model.name, config.model.width = "cnn", 4
  config.model.downsample = "conv_then_pool"
  variables = models.create_model(config.model, 10).init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  state = types.SimpleNamespace(params=variables["params"], batch_stats=variables["batch_stats"])
  export = tmp_path / "export"
  checkpoint.export_variables(str(export), state,
                              checkpoint.export_info(config, [str(i) for i in range(10)], 0))
  config.model.init_from = str(export)
  loaded = weights.init_variables(config.model, variables, print)  # the same layout loads
  assert jax.tree.structure(loaded) == jax.tree.structure(dict(variables))
  config.model.downsample = "pool_then_conv"
  with pytest.raises(ConfigError, match=r"holds a cnn with config.model.downsample="
                                        r"'conv_then_pool'; this config has 'pool_then_conv'"):
    weights.init_variables(config.model, variables, print)
