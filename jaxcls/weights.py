"""Pretrained weights in and out: torchvision / timm ResNet state dicts <-> jaxcls variables.

    python -m jaxcls.weights import SRC --model resnet50 --out DIR
    python -m jaxcls.weights export --workdir RUN --out FILE.safetensors

`import` reads a torchvision or timm ResNet-18/34/50/101/152 state dict (`.safetensors` with
safetensors' numpy API, no torch needed; `.pth` / `.pt` with torch) and writes a jaxcls
export (checkpoint.export_variables); `export` writes a run's (or an export's) weights as a
torchvision state dict. `init_variables` is what `config.model.init_from` starts training from.

The two layouts differ only in names and axis order: torch convolutions are (out, in, h, w),
Flax's (h, w, in, out); a torch Linear is (out, in), a Dense (in, out). BatchNorm's running
variance is used the same way by both at inference ((x - mean) / sqrt(var + eps)), so it is
copied unchanged; PyTorch's unbiased update of it during training is not part of a state.
timm's ResNets (resnet18 ... resnet152, the v1.5 layout) use torchvision's names.
"""

import argparse
import os
import re
import sys
import types

import flax
import jax
import ml_collections
import numpy as np

from jaxcls import checkpoint, models
from jaxcls import workdir as workdir_lib
from jaxcls.errors import ConfigError, WeightsError
from jaxcls.models import resnet

# What an imported ImageNet model expects at eval (torchvision's and timm's resnet defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torch module name of a block's parts <-> the Flax module name in jaxcls.models.resnet.
_BLOCK_PARTS = {"downsample.0": "proj_conv", "downsample.1": "proj_bn"}
_TORCH_MODULE = re.compile(r"^(conv1|bn1|fc|layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[01]))$")
_FLAX_MODULE = re.compile(r"^stage(\d+)_block(\d+)$")
# BatchNorm: torch name -> (collection, Flax name); num_batches_tracked is dropped.
_NORM = {"weight": ("params", "scale"), "bias": ("params", "bias"),
         "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_PREFIXES = ("module.", "model.")  # DistributedDataParallel and some trainers' wrappers


def resnet_names() -> list[str]:
  """The models whose weights map to torchvision's layout."""
  return sorted(name for name, fn in models.MODELS.items()
                if getattr(fn, "func", None) is resnet.ResNet)


# ---- reading and writing state dicts


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch state dict as numpy arrays, from .safetensors (no torch) or .pth / .pt (torch)."""
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file.")
  if path.endswith(".safetensors"):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    try:
      state = st_numpy.load_file(path)
    except Exception as e:  # a safetensors error of any kind: the header or the data
      raise WeightsError(f"{path}: not a readable safetensors file ({e}).") from None
  elif path.endswith((".pth", ".pt")):
    state = _read_torch(path)
  else:
    raise WeightsError(f"{path}: expected a .safetensors, .pth or .pt file.")
  return _strip_prefix(state)


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightsError(
        f"{path}: reading .pth / .pt needs PyTorch (pip install torch), which jaxcls does not "
        "install. Or convert it to safetensors once where torch is installed: "
        "python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('in.pth', "
        "map_location='cpu'), 'out.safetensors')\"") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip or torch errors
    raise WeightsError(f"{path}: torch.load failed ({e}).") from None
  for key in ("state_dict", "model"):  # training checkpoints wrap the weights
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  if not isinstance(state, dict):
    raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict.")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(state: dict) -> dict:
  for prefix in _PREFIXES:
    if state and all(key.startswith(prefix) for key in state):
      return {key[len(prefix):]: value for key, value in state.items()}
  return state


def write_state_dict(state: dict[str, np.ndarray], path: str) -> None:
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)


# ---- names and layouts


def _flax_module(torch_module: str) -> tuple[str, ...]:
  match = _TORCH_MODULE.match(torch_module)
  if match.group(2) is None:
    return ({"conv1": "stem_conv", "bn1": "stem_bn", "fc": "head"}[torch_module],)
  part = match.group(4)
  return (f"stage{match.group(2)}_block{int(match.group(3)) + 1}", _BLOCK_PARTS.get(part, part))


def from_torch(state: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
  """torch names -> {(collection, *module path, name): array} in Flax layout, and the keys
  that name nothing in a jaxcls ResNet. Knows nothing of the model's depth or widths."""
  flat, leftover = {}, []
  for key, value in state.items():
    module, _, name = key.rpartition(".")
    if not _TORCH_MODULE.match(module):
      leftover.append(key)
      continue
    path = _flax_module(module)
    value = np.asarray(value)
    if "bn" in path[-1]:  # stem_bn, bn1..3, proj_bn
      if name == "num_batches_tracked":
        continue  # only used when PyTorch's momentum is None
      if name not in _NORM:
        leftover.append(key)
        continue
      collection, name = _NORM[name]
      flat[(collection, *path, name)] = value.astype(np.float32)
    elif name == "weight" and value.ndim in (2, 4):
      # (out, in, h, w) -> (h, w, in, out); a Linear's (out, in) -> (in, out)
      flat[("params", *path, "kernel")] = value.astype(np.float32).transpose(
          (2, 3, 1, 0) if value.ndim == 4 else (1, 0))
    elif name == "bias" and path == ("head",):
      flat[("params", "head", "bias")] = value.astype(np.float32)
    else:
      leftover.append(key)
  return flat, leftover


def _torch_module(path) -> str:
  block = _FLAX_MODULE.match(path[0])
  if block and len(path) == 2:
    parts = {v: k for k, v in _BLOCK_PARTS.items()}
    return f"layer{block.group(1)}.{int(block.group(2)) - 1}.{parts.get(path[1], path[1])}"
  modules = {"stem_conv": "conv1", "stem_bn": "bn1", "head": "fc"}
  if path[0] in modules and len(path) == 1:
    return modules[path[0]]
  raise WeightsError(f"{'/'.join(path)}: not part of a ResNet; only jaxcls ResNets export "
                     f"to torchvision's layout ({', '.join(resnet_names())}).")


def torch_name(key: tuple) -> str:
  """The torch name of a Flax variable (collection, *path, name)."""
  collection, *path, name = key
  module = _torch_module(path)
  if name == "kernel":
    return f"{module}.weight"
  if module == "fc":
    return "fc.bias"
  return f"{module}.{ {v: k for k, v in _NORM.items()}[(collection, name)] }"


def to_torch(variables, step: int = 0) -> dict[str, np.ndarray]:
  """jaxcls ResNet {"params", "batch_stats"} -> a torchvision state dict (numpy)."""
  flat = flax.traverse_util.flatten_dict(
      {"params": variables["params"], "batch_stats": variables["batch_stats"]})
  state = {}
  for key, value in flat.items():
    value = np.asarray(value, np.float32)
    name = torch_name(key)
    if key[-1] == "kernel":
      value = value.transpose((3, 2, 0, 1) if value.ndim == 4 else (1, 0))
    state[name] = value
    if key[-1] == "var":  # the batches PyTorch's BatchNorm has seen: a buffer strict
      # loading wants, read only when its momentum is None
      state[name.replace("running_var", "num_batches_tracked")] = np.asarray(step, np.int64)
  return state


# ---- the model a state dict implies


def model_settings(flat: dict, source: str) -> dict:
  """stem, width and class count from the stem convolution and the head."""
  for key in (("params", "stem_conv", "kernel"), ("params", "head", "kernel")):
    if key not in flat:
      raise WeightsError(f"{source}: no {'conv1' if 'stem_conv' in key else 'fc'}.weight; "
                         "not a torchvision / timm ResNet state dict.")
  size, _, _, width = flat[("params", "stem_conv", "kernel")].shape
  stems = {7: "imagenet", 3: "small"}
  if size not in stems:
    raise WeightsError(f"{source}: conv1.weight is {size}x{size}; a jaxcls ResNet's stem is "
                       "7x7 ('imagenet') or 3x3 ('small'). Deep-stem variants (timm's "
                       "resnet50d and the like) are not supported.")
  return {"stem": stems[size], "width": int(width),
          "num_classes": int(flat[("params", "head", "kernel")].shape[1])}


def expected_shapes(architecture, settings: dict) -> dict:
  """{(collection, *path): shape} of the variables of architecture(num_classes=..., width=...,
  stem=...), e.g. models.MODELS['resnet50']; nothing is allocated."""
  model = architecture(num_classes=settings["num_classes"],
                                    width=settings["width"], stem=settings["stem"])
  shapes = jax.eval_shape(lambda rng: model.init(rng, np.zeros((1, 32, 32, 3), np.float32),
                                                 train=False), jax.random.key(0))
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(shapes).items()}


def _names(keys, limit: int = 8) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def check_complete(flat: dict, leftover: list, model_name: str, source: str,
                   architecture=None) -> dict:
  """The implied settings, after checking that every key maps and every shape fits.

  architecture: the model's constructor, by default models.MODELS[model_name].
  """
  settings = model_settings(flat, source)
  expected = expected_shapes(architecture or models.MODELS[model_name], settings)
  extra = list(leftover) + [torch_name(k) for k in flat if k not in expected]
  if extra:
    raise WeightsError(f"{source}: keys that a {model_name} has no place for: {_names(extra)}.")
  missing = [torch_name(k) for k in expected if k not in flat]
  if missing:
    raise WeightsError(f"{source}: keys a {model_name} needs are missing: {_names(missing)}.")
  for key, shape in expected.items():
    if flat[key].shape != shape:
      raise WeightsError(f"{source}: {torch_name(key)} has shape {flat[key].shape} in Flax "
                         f"layout; a {model_name} with {settings} needs {shape}.")
  return settings


# ---- import and export


def import_weights(src: str, model_name: str, out: str) -> dict:
  """A torchvision / timm state dict file -> a jaxcls export in `out`; returns its info."""
  if model_name not in resnet_names():
    raise WeightsError(f"--model {model_name!r}: use one of {', '.join(resnet_names())}.")
  flat, leftover = from_torch(read_state_dict(src))
  settings = check_complete(flat, leftover, model_name, src)
  spec = ml_collections.ConfigDict({
      "model": {"name": model_name, "stem": settings["stem"], "width": settings["width"]},
      "data": {"num_classes": settings["num_classes"], "image_size": 224, "eval_resize": 256,
               "mean": IMAGENET_MEAN, "std": IMAGENET_STD}})
  info = checkpoint.export_info(spec, [str(i) for i in range(settings["num_classes"])], 0)
  info["imported_from"] = os.path.abspath(src)
  variables = flax.traverse_util.unflatten_dict(flat)
  checkpoint.export_variables(out, types.SimpleNamespace(**variables), info)
  return info


def _export_of(path: str) -> str:
  """A run directory's export, or `path` when it is an export itself."""
  if os.path.isfile(workdir_lib.export_info_path(path)):
    return path
  export = workdir_lib.export_dir(path)
  if not os.path.isfile(workdir_lib.export_info_path(export)):
    raise WeightsError(f"{path}: neither a run with a finished export nor an export "
                       "(written at the end of training, or by `jaxcls.weights import`).")
  return export


def export_weights(path: str, out: str) -> dict:
  """A run's (or an export's) weights -> a torchvision-format .safetensors at `out`."""
  variables, info = checkpoint.load_export(_export_of(path))
  state = to_torch(variables, step=info.get("step", 0))
  write_state_dict(state, out)
  return info


# ---- config.model.init_from


def init_variables(model_config, target: dict, log) -> dict:
  """The starting {"params", "batch_stats"} for `config.model.init_from`.

  target holds the freshly initialized variables; each leaf of the result is the loaded
  numpy array, or the target's own leaf for a head whose class count differs (re-initialized,
  logged). Any other mismatch is a ConfigError naming the parameter.
  """
  path = model_config.init_from
  where = f"config.model.init_from={path!r}"
  try:
    if os.path.isdir(path):
      variables, info = checkpoint.load_export(path)
      flat = flax.traverse_util.flatten_dict(dict(variables))
      saved = info.get("model", {})
      for key in ("name", "stem", "width"):
        if key in saved and saved[key] != model_config[key]:
          raise ConfigError(f"{where} holds a {saved.get('name')} with stem "
                            f"{saved.get('stem')!r} and width {saved.get('width')}; "
                            f"config.model.{key} is {model_config[key]!r}.")
      if saved.get("name") == "cnn":  # same arrays either way; exports before the key: pool first
        layouts = [models.downsample_of(m) for m in (saved, model_config)]
        if layouts[0] != layouts[1]:
          raise ConfigError(f"{where} holds a cnn with config.model.downsample="
                            f"{layouts[0]!r}; this config has {layouts[1]!r}: the same "
                            "arrays compute another network. Set the key to the export's.")
    else:
      flat, leftover = from_torch(read_state_dict(path))
      if leftover:
        raise ConfigError(f"{where}: keys a jaxcls ResNet has no place for: "
                          f"{_names(leftover)}.")
  except WeightsError as e:
    raise ConfigError(f"{where}: {e}") from None
  wanted = flax.traverse_util.flatten_dict(target)
  extra = [k for k in flat if k not in wanted]
  missing = [k for k in wanted if k not in flat]
  if extra or missing:
    raise ConfigError(f"{where} does not fit config.model.name={model_config.name!r}: "
                      + "; ".join(f"{label}: {_names('/'.join(k) for k in keys)}"
                                  for label, keys in (("not in the model", extra),
                                                      ("not in the file", missing)) if keys))
  result = {}
  # The stem convolution first: a width or stem mismatch is named where it starts.
  for key, leaf in sorted(wanted.items(), key=lambda item: (item[0][1] != "stem_conv",
                                                            item[0][1] == "head")):
    value = np.asarray(flat[key])
    if value.shape == leaf.shape:
      result[key] = value.astype(leaf.dtype)
    elif key[1] == "head" and value.shape[:-1] == leaf.shape[:-1]:
      result[key] = leaf
    else:
      hint = (" (its last size is config.model.width; 7x7 is config.model.stem='imagenet', "
              "3x3 'small')" if key[1] == "stem_conv" else "")
      raise ConfigError(f"{where}: {'/'.join(key)} has shape {value.shape} there, "
                        f"{tuple(leaf.shape)} in this model{hint}.")
  bias = ("params", "head", "bias")
  if bias in result and result[bias] is wanted[bias]:
    log(f"init_from: head re-initialized: {flat[bias].shape[0]} classes in {path}, "
        f"{wanted[bias].shape[0]} in config.data.num_classes (params/head/kernel, "
        "params/head/bias).")
  return flax.traverse_util.unflatten_dict(result)


def _verb(function) -> str:
  """The subcommand of a function: import_weights -> 'import'."""
  return function.__name__.split("_")[0]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  importer = commands.add_parser(_verb(import_weights),
                                 help="torchvision / timm state dict -> jaxcls export")
  importer.add_argument("src", help="a .safetensors, .pth or .pt state dict")
  importer.add_argument("--model", required=True, choices=resnet_names())
  importer.add_argument("--out", required=True, help="the export directory to write")
  exporter = commands.add_parser(_verb(export_weights),
                                 help="jaxcls run -> torchvision .safetensors")
  exporter.add_argument("--workdir", required=True, help="a run directory, or an export")
  exporter.add_argument("--out", required=True, help="the .safetensors file to write")
  args = parser.parse_args(argv)
  try:
    if args.command == _verb(import_weights):
      info = import_weights(args.src, args.model, args.out)
      model = info["model"]
      print(f"{args.src} -> {args.out}: {model['name']}, stem {model['stem']!r}, width "
            f"{model['width']}, {info['num_classes']} classes.")
    else:
      info = export_weights(args.workdir, args.out)
      print(f"{args.workdir} (step {info.get('step', 0)}) -> {args.out}: torchvision "
            f"{info['model']['name']} state dict, {info['num_classes']} classes.")
  except (WeightsError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
