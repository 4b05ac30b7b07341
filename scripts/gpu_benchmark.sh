#!/usr/bin/env bash
# jaxcls's speed on one GPU, in one command: train step vs a minimal Flax loop and torchvision
# under torch.compile, the input pipeline's cost, the JPEG decode on the CPU (per core) and on
# the GPU (DALI, config.data.decoder='dali'), and a full CIFAR-10 training run.
#
# On a machine with pip (prepares what travels; the GPU machine has no network):
#   scripts/gpu_benchmark.sh --download-wheels     # grain, ml-collections, ... into .whl/
#   mkdir -p .bench_data && cp -r ../shared/data/cifar10_jpeg .bench_data/   # git-ignored
# On the GPU machine, from the repository root (torch and torchvision optional):
#   scripts/gpu_benchmark.sh --data .bench_data                    # all stages, ~10 minutes
#   scripts/gpu_benchmark.sh --data .bench_data --stages train_step          # ~5 minutes
#   scripts/gpu_benchmark.sh --data .bench_data --stages end_to_end,cifar    # ~5 minutes
#   scripts/gpu_benchmark.sh --stages decode     # CPU decode per core, then DALI vs CPU path
#     (the DALI row needs nvidia-dali-cuda120/130 installed there, too large to carry; without
#     it the row is skipped and says so; never run yet: no GPU machine has had DALI)
# To try it on a CPU (tiny sizes, a few minutes; the figures mean nothing):
#   scripts/gpu_benchmark.sh --data ../shared/data --cpu-smoke
#
# --data DIR holds cifar10_jpeg/{train,test}.npz. Logs, JSON and the summary table (a few
# files) go to --out (default: runs/gpu_benchmark, or $OUT/gpu_benchmark when $OUT is set);
# generated images, records and the CIFAR-10 run's workdir to --scratch (/tmp/jaxcls_bench).
# Reference figures for one H200: ../shared/DESIGN.md; results: benchmarks/README.md "Speed".
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
DATA=""
STAGES="train_step,end_to_end,decode,cifar"
SMOKE=0
OUT_DIR="${OUT:+$OUT/gpu_benchmark}"
OUT_DIR="${OUT_DIR:-runs/gpu_benchmark}"
SCRATCH=/tmp/jaxcls_bench
# Missing on the GPU machine's image (Python 3.12); tensorflow-datasets only for its import.
WHEELS="grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 tensorboardX==2.6.5
  tensorflow-datasets==4.9.10 dm-tree immutabledict simple-parsing tensorflow-metadata termcolor
  toml docstring-parser googleapis-common-protos portpicker"

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

download_wheels() {
  local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  mkdir -p .whl
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $platforms -d .whl $WHEELS
  "$PYTHON" -m pip wheel -q --no-deps -w .whl promise==2.3  # sdist only: build it here
  du -sh .whl
  echo "Carry .whl (and .bench_data) to the GPU machine with the repository."
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --stages) STAGES="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --scratch) SCRATCH="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    --download-wheels) download_wheels; exit 0 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "Installing the carried wheels into /tmp/jaxcls_site ..."
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jaxcls_site .whl/*.whl
  export PYTHONPATH="/tmp/jaxcls_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
: > "$LOG"
export STAGES
run() {  # echo, run, keep the output in the log; a failure is noted and the next stage runs
  echo "+ $*" | tee -a "$LOG"
  "$@" 2>&1 | tee -a "$LOG" || echo "FAILED (exit ${PIPESTATUS[0]}): $*" | tee -a "$LOG"
}

"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, jax
print(f"jax {jax.__version__} on {jax.devices()}")
for name in ("flax", "optax", "grain", "ml_collections", "orbax.checkpoint", "torch", "torchvision"):
  try:
    module = importlib.import_module(name)
    print(f"  {name} {getattr(module, '__version__', '?')}")
  except ImportError as e:
    print(f"  {name}: missing ({e})")
EOF

CIFAR=""
if [[ -n "$DATA" && -f "$DATA/cifar10_jpeg/train.npz" ]]; then
  CIFAR="$DATA/cifar10_jpeg"
elif [[ -n "$DATA" && -f "$DATA/train.npz" ]]; then
  CIFAR="$DATA"
else
  echo "No CIFAR-10 npz files under --data '$DATA': the CIFAR rows are skipped." | tee -a "$LOG"
fi
WORK="$SCRATCH/data"  # generated images and converted records
C10_RUN="$SCRATCH/cifar10"

if [[ $SMOKE == 1 ]]; then
  TS_ARGS=(--rows smoke --rounds 1 --steps 2)
  E2E_COMMON=(--rounds 1 --steps 2 --work "$WORK")
  E2E_CIFAR=(--limit 512 --set "model.name='resnet_tiny'" --set "model.stem='small'" --set model.width=8)
  E2E_IMAGENET=(--imagenet_like 64 --classes 4 --photo_size 96x72 --resize 64
                --set data.image_size=48 --set data.eval_resize=56)
  DECODE_ARGS=(--rounds 1 --seconds 0.1 --seeds 2)
  CIFAR_ARGS=(--config.num_train_steps=20 --config.model.name=resnet_tiny --config.model.stem=small --config.model.width=8
              --config.batch_size=128 --config.eval_every_epochs=0)
else
  TS_ARGS=(--gpu --torch --rounds 3 --seconds 2)
  E2E_COMMON=(--gpu --rounds 3 --seconds 4 --work "$WORK")
  E2E_CIFAR=(--workers 4,-1)  # the config's 4 worker processes, and cores - 2
  E2E_IMAGENET=(--imagenet_like 10000)
  DECODE_ARGS=(--rounds 3 --seconds 2)
  CIFAR_ARGS=()  # the config as a user runs it
fi

if [[ ",$STAGES," == *",train_step,"* ]]; then
  echo -e "\n### train step: jaxcls vs minimal Flax loop vs torch.compile" | tee -a "$LOG"
  rm -f "$OUT_DIR/train_step.json"
  run "$PYTHON" benchmarks/train_step.py "${TS_ARGS[@]}" --json "$OUT_DIR/train_step.json"
fi

if [[ ",$STAGES," == *",end_to_end,"* ]]; then
  echo -e "\n### end to end: input pipeline vs device batch" | tee -a "$LOG"
  rm -f "$OUT_DIR"/end_to_end_*.json
  run "$PYTHON" benchmarks/end_to_end.py "${E2E_COMMON[@]}" "${E2E_IMAGENET[@]}" \
    --json "$OUT_DIR/end_to_end_imagenet.json"
  if [[ -n "$CIFAR" ]]; then
    run "$PYTHON" benchmarks/end_to_end.py "${E2E_COMMON[@]}" --cifar "$CIFAR" ${E2E_CIFAR[@]+"${E2E_CIFAR[@]}"} \
      --json "$OUT_DIR/end_to_end_cifar.json"
  fi
fi

if [[ ",$STAGES," == *",decode,"* ]]; then
  echo -e "\n### decode: per core on the CPU (PIL loop, main, reduced); DALI vs the CPU path" \
    | tee -a "$LOG"
  rm -f "$OUT_DIR"/decode_*.json
  if "$PYTHON" -c "import skimage, sklearn, simplejpeg" 2>/dev/null; then
    run "$PYTHON" benchmarks/decode.py "${DECODE_ARGS[@]}" --json "$OUT_DIR/decode_cpu.json"
  else
    echo "scikit-image / scikit-learn / simplejpeg missing: benchmarks/decode.py skipped." \
      | tee -a "$LOG"
  fi
  # The same ImageNet-like end-to-end run twice: grain workers decoding on the host (the
  # default), then DALI decoding on the GPU (the same crop boxes, drawn on the host).
  run "$PYTHON" benchmarks/end_to_end.py "${E2E_COMMON[@]}" "${E2E_IMAGENET[@]}" \
    --sources array_record --json "$OUT_DIR/decode_e2e_cpu.json"
  if "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then
    run "$PYTHON" benchmarks/end_to_end.py "${E2E_COMMON[@]}" "${E2E_IMAGENET[@]}" \
      --sources array_record --set "data.decoder='dali'" --json "$OUT_DIR/decode_e2e_dali.json"
  else
    echo "NVIDIA DALI is not installed (pip install 'jaxcls[dali]'): the DALI row is skipped." \
      | tee -a "$LOG"
  fi
fi

if [[ ",$STAGES," == *",cifar,"* && -n "$CIFAR" ]]; then
  echo -e "\n### full CIFAR-10 run: configs/cifar10_resnet18.py" | tee -a "$LOG"
  rm -rf "$C10_RUN"
  run "$PYTHON" -m jaxcls.main --config configs/cifar10_resnet18.py --workdir "$C10_RUN" \
    --config.data.path="$CIFAR" ${CIFAR_ARGS[@]+"${CIFAR_ARGS[@]}"}
  cp "$C10_RUN/results.json" "$OUT_DIR/cifar10_results.json" 2>/dev/null || true
  cp "$C10_RUN/metrics.jsonl" "$OUT_DIR/cifar10_metrics.jsonl" 2>/dev/null || true
fi

echo -e "\n### summary" | tee -a "$LOG"
"$PYTHON" - "$OUT_DIR" "$C10_RUN" <<'EOF' 2>&1 | tee "$OUT_DIR/summary.md" | tee -a "$LOG"
import json, os, sys
out, workdir = sys.argv[1:3]

def load(name):
  path = os.path.join(out, name)
  return json.load(open(path)) if os.path.exists(path) else None

ts = load("train_step.json")
if ts:
  print(f"Train step, synthetic data on the device ({ts['machine']}):\n")
  print("| model | compute | jaxcls images/s | minimal images/s | jaxcls/minimal | "
        "torch images/s | jaxcls/torch |\n|---|---|---|---|---|---|---|")
  for r in ts["rows"]:
    cell = lambda k, f: format(r[k], f) if k in r else "-"
    print(f"| {r['row']} | {r['dtype']} | {cell('jaxcls', ',.0f')} | {cell('minimal', ',.0f')} | "
          f"{cell('jaxcls/minimal', '.3f')} | {cell('torch', ',.0f')} | "
          f"{cell('jaxcls/torch', '.3f')} |")
for name in ("end_to_end_imagenet.json", "end_to_end_cifar.json", "decode_e2e_cpu.json",
             "decode_e2e_dali.json"):
  e2e = load(name)
  if e2e:
    print(f"\nEnd to end, input pipeline vs device batch ({name}):\n")
    print("| run | input | workers | images/s | ratio |\n|---|---|---|---|---|")
    for r in e2e["rows"]:
      print(f"| {r['row']} | {r['input']} | {r.get('workers', '-')} | "
            f"{r['images_per_sec']:,.0f} | {r['ratio']:.3f} |")
dec = load("decode_cpu.json")
if dec:
  print(f"\nDecode + crop per core, images per CPU-second ({dec['machine']}):\n")
  print("| size | path | ratios |\n|---|---|---|")
  for r in dec["rows"]:
    if r["path"] != "fidelity":
      print(f"| {r['size']} | {r['path']} | " + ", ".join(
          f"{k} {v:.2f}" for k, v in r.items() if "/" in k) + " |")
results = os.path.join(workdir, "results.json")
if ",cifar," in f",{os.environ['STAGES']}," and os.path.exists(results):
  res = json.load(open(results))
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  batch = json.load(open(os.path.join(workdir, "config.json")))["batch_size"]
  # The first log record's rate covers the steps since the loop began: it dates the start.
  start = train[0]["time"] - train[0]["step"] * batch / train[0]["images_per_sec"]
  rates = sorted(r["images_per_sec"] for r in train[1:]) or [train[0]["images_per_sec"]]
  print(f"\nFull CIFAR-10 run ({workdir}):\n")
  print(f"- test accuracy {res['eval']['accuracy']:.4f} after {res['step']} steps")
  print(f"- training {res['train_seconds']:.1f}s (evals and checkpoints included), compile "
        f"{res['compile_seconds']:.1f}s, all in {res['total_seconds']:.1f}s")
  print(f"- train images/s (median of log intervals): {rates[len(rates) // 2]:,.0f}")
  for target in (0.90, 0.91, 0.92):
    hit = next((r for r in evals if r["accuracy"] >= target), None)
    print(f"- {target:.0%} first reached: " + (
        f"step {hit['step']}, {hit['time'] - start:.1f}s after training began" if hit else "no"))
EOF
echo "Log: $LOG; summary: $OUT_DIR/summary.md"
