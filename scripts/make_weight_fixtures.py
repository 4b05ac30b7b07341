"""Writes tests/fixtures/: small torchvision and timm ResNet weights and their PyTorch outputs.

    python scripts/make_weight_fixtures.py                      # tests/fixtures/
    python scripts/make_weight_fixtures.py --parity_dir /tmp/p  # also full resnet18 / resnet50

Run it once, in an environment with torch, torchvision, timm and safetensors (none of them
jaxcls dependencies); tests/test_weights.py then checks the import against these outputs
without torch. The fixtures (about 300 KB) are seeded, random-valued state dicts:

- torchvision_pieces.safetensors: a 7x7 stem (conv1, bn1), a BasicBlock with stride 2 and a
  projection (layer2.0), a Bottleneck with stride 2 and a projection (layer3.0), the head (fc);
  torchvision_pieces.npz: each piece's input and output in eval mode (NCHW, float32).
- torchvision_keys.json: every key of torchvision's resnet18 and resnet50 with its shape,
  what `load_state_dict(strict=True)` asks of an export.
- timm_basic.safetensors, timm_bottleneck.safetensors: whole timm ResNets with four stages of
  one block, width 4 (channels 4, 8, 16, 32; the stem 4 wide too), 5 classes; timm_*.npz: a
  batch and its logits.

--parity_dir writes resnet18.safetensors / resnet50.safetensors (torchvision's random init, BN
statistics from two random batches) and parity.npz (a 224px batch and both models' logits).
"""

import argparse
import json
import pathlib

import numpy as np
import timm.models.resnet as timm_resnet
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet as tv_resnet

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
  """BatchNorm at its defaults (scale 1, statistics 0 and 1) would hide a swapped name."""
  for norm in module.modules():
    if isinstance(norm, nn.BatchNorm2d):
      n = norm.num_features
      norm.weight.data = 0.5 + torch.rand(n, generator=generator)
      norm.bias.data = 0.2 * torch.randn(n, generator=generator)
      norm.running_mean.data = 0.2 * torch.randn(n, generator=generator)
      norm.running_var.data = 0.5 + torch.rand(n, generator=generator)
      norm.num_batches_tracked.fill_(123)


@torch.no_grad()
def calibrate_norms(model: nn.Module, generator: torch.Generator) -> None:
  """BatchNorm statistics from a few random batches (as after training: logits of a
  sensible size), then eval mode."""
  for norm in model.modules():
    if isinstance(norm, nn.BatchNorm2d):
      norm.momentum = None  # a cumulative average over the batches
  model.train()
  for _ in range(2):
    model(torch.randn(8, 3, 224, 224, generator=generator))
  model.eval()


def projection(inplanes: int, outplanes: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=2, bias=False),
                       nn.BatchNorm2d(outplanes))


def state_of(modules: dict) -> dict:
  return {f"{name}.{key}": value.contiguous() for name, module in modules.items()
          for key, value in module.state_dict().items()}


@torch.no_grad()
def torchvision_pieces(generator: torch.Generator) -> tuple[dict, dict]:
  pieces = {
      "conv1": nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False),
      "bn1": nn.BatchNorm2d(8),
      "layer2.0": tv_resnet.BasicBlock(8, 16, stride=2, downsample=projection(8, 16)),
      "layer3.0": tv_resnet.Bottleneck(16, 8, stride=2, downsample=projection(16, 32)),
      "fc": nn.Linear(32, 10),
  }
  for module in pieces.values():
    randomize_norms(module, generator)
    module.eval()
  x = {"stem": torch.randn(2, 3, 32, 32, generator=generator),
       "basic": torch.randn(2, 8, 8, 8, generator=generator),
       "bottleneck": torch.randn(2, 16, 8, 8, generator=generator),
       "head": torch.randn(2, 32, 4, 4, generator=generator)}
  stem = nn.Sequential(pieces["conv1"], pieces["bn1"], nn.ReLU(),
                       nn.MaxPool2d(3, stride=2, padding=1))
  y = {"stem": stem(x["stem"]), "basic": pieces["layer2.0"](x["basic"]),
       "bottleneck": pieces["layer3.0"](x["bottleneck"]),
       "head": pieces["fc"](x["head"].mean(dim=(2, 3)))}
  arrays = {f"{k}_in": v.numpy() for k, v in x.items()}
  arrays.update({f"{k}_out": v.numpy() for k, v in y.items()})
  return state_of(pieces), arrays


@torch.no_grad()
def timm_model(block, generator: torch.Generator) -> tuple[dict, dict]:
  model = timm_resnet.ResNet(block, layers=(1, 1, 1, 1), channels=(4, 8, 16, 32),
                             num_classes=5)
  # timm's stem is 64 wide whatever the stages; jaxcls's stem is as wide as the first stage,
  # so the stem and the first stage are rebuilt 4 wide, from timm's own block.
  model.conv1 = nn.Conv2d(3, 4, 7, stride=2, padding=3, bias=False)
  model.bn1 = nn.BatchNorm2d(4)
  out = 4 * block.expansion
  downsample = (nn.Sequential(nn.Conv2d(4, out, 1, bias=False), nn.BatchNorm2d(out))
                if out != 4 else None)
  model.layer1 = nn.Sequential(block(4, 4, downsample=downsample))
  randomize_norms(model, generator)
  for head in (model.fc.weight, model.fc.bias):  # timm starts the head at 0
    head.data = 0.1 * torch.randn(head.shape, generator=generator)
  model.eval()
  x = torch.randn(2, 3, 32, 32, generator=generator)
  return ({k: v.contiguous() for k, v in model.state_dict().items()},
          {"input": x.numpy(), "logits": model(x).numpy()})


@torch.no_grad()
def full_parity(directory: pathlib.Path, generator: torch.Generator) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  x = torch.randn(4, 3, 224, 224, generator=generator)
  arrays = {"input": x.numpy()}
  for name in ("resnet18", "resnet50"):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    calibrate_norms(model, generator)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / f"{name}.safetensors"))
    arrays[name] = model(x).numpy()
  np.savez(directory / "parity.npz", **arrays)
  print(f"wrote {directory}: resnet18, resnet50 and parity.npz")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=str(FIXTURES))
  parser.add_argument("--parity_dir", default="", help="also write full-size parity weights")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  generator = torch.Generator().manual_seed(20261202)
  torch.manual_seed(0)  # the modules' own initializers
  state, arrays = torchvision_pieces(generator)
  save_file(state, str(out / "torchvision_pieces.safetensors"))
  np.savez(out / "torchvision_pieces.npz", **arrays)
  for name, block in (("basic", timm_resnet.BasicBlock), ("bottleneck", timm_resnet.Bottleneck)):
    state, arrays = timm_model(block, generator)
    save_file(state, str(out / f"timm_{name}.safetensors"))
    np.savez(out / f"timm_{name}.npz", **arrays)
  keys = {name: {k: list(v.shape) for k, v in getattr(torchvision.models, name)()
                 .state_dict().items()} for name in ("resnet18", "resnet50")}
  (out / "torchvision_keys.json").write_text(json.dumps(keys, separators=(",", ":")))
  print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")
  if args.parity_dir:
    full_parity(pathlib.Path(args.parity_dir), generator)


if __name__ == "__main__":
  main()
