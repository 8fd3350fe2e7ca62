#!/usr/bin/env bash
# The GPU figures of docs/results.md and benchmarks/README.md in one command, on a machine with a CUDA GPU (no network needed):
#
#   bash benchmarks/gpu.sh DATA_ROOT OUT_DIR [STAGE ...]
#
# DATA_ROOT holds MNIST/raw (the four IDX files, or their .gz, unpacked here) and celeba-10k/img_align_celeba.
# OUT_DIR receives each stage's log, tables and images; runs go to SCRATCH (default /tmp/vae-gpu).
# Stages, in this order by default:
#   env         the GPU, driver and library versions
#   check       benchmarks/gpu_check.py: every family in fp32, bf16 and fp16, resumed, sampled, evaluated
#   tests       the test suite with the GPU visible: the tests that train on the default device train on it
#   throughput  benchmarks/throughput.py: the reference workload (and what helps it), CelebA 64x64 with and
#               without the decode cache, and the input pipeline alone
#   celeba      configs/celeba.yaml for CELEBA_TRAIN_S seconds (then SIGINT: a checkpoint at that step), the
#               gallery (sample, interpolate, traverse, reconstruct) and evaluate.py
#   iwae        evaluate.py --k 5000 on the full binarised MNIST test set, timed, for each run in IWAE_RUNS
#               (default: runs/binarized-mnist-*/ that hold model.safetensors)
# Each stage runs under a time limit (<STAGE>_S seconds, defaults below) and logs to OUT_DIR/<stage>.log; one that
# fails or runs out of time does not stop the next. A stage's wall time is printed as it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: bash benchmarks/gpu.sh DATA_ROOT OUT_DIR [env check tests throughput celeba iwae]" >&2
  exit 2
fi
data=$(realpath "$1"); out=$(realpath -m "$2"); shift 2
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(env check tests throughput celeba iwae)
scratch="${SCRATCH:-/tmp/vae-gpu}"
mkdir -p "$out" "$scratch"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
# PYTHON: the interpreter that has torch (default python3), as `python` for every command below
bin="$scratch/bin"; mkdir -p "$bin"
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "${PYTHON:-python3}")" > "$bin/python"; chmod +x "$bin/python"
export PATH="$bin:$PATH"
for gz in "$data"/MNIST/raw/*.gz; do [[ -e "$gz" && ! -e "${gz%.gz}" ]] && gunzip -k "$gz"; done
celeba="$data/celeba-10k"

stage_env() {
  nvidia-smi
  python -c "import torch, accelerate, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'accelerate', accelerate.__version__, 'torchvision', torchvision.__version__); \
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
  nproc; free -g
}

stage_check() {
  python benchmarks/gpu_check.py --data "$data" --out "$scratch/check" --jobs "${CHECK_JOBS:-8}" \
    --steps "${CHECK_STEPS:-200}" ${CHECK_ARGS:-}
  local rc=$?
  cp "$scratch/check/check.json" "$out/" 2>/dev/null
  grep -l "\[exit [1-9]" "$scratch"/check/*.log 2>/dev/null | xargs -r -I{} cp {} "$out/"  # failed runs' logs
  return $rc
}

stage_tests() {
  local skip=()  # tests whose optional package or data is not here (none of them touches the GPU)
  python -c "import mlflow" 2>/dev/null || skip+=(--ignore tests/test_training_trackers.py)
  python -c "import datasets" 2>/dev/null || skip+=(--ignore tests/test_data_hf.py)
  [[ -d "$data/FashionMNIST/raw" ]] || skip+=(--deselect "tests/test_training_loop.py::test_short_run_writes_the_run_directory[fashion]"
    --deselect tests/test_data_loading.py::test_mnist_loads_once_as_uint8)  # they read Fashion-MNIST
  local workers=()
  python -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
  VAE_TEST_DATA="$data" python -m pytest -q -rfE -p no:cacheprovider "${workers[@]}" "${skip[@]}" \
    --junitxml "$out/tests.xml" ${TEST_ARGS:-}
}

stage_throughput() {
  local t=benchmarks/throughput.py
  python $t data.root="$data" --repeats 2 --json "$out/throughput-reference.json"
  # what a launch-bound small workload gains from compiling, and from a larger batch
  python $t data.root="$data" --repeats 1 --sample_n 0 --steps 400 --warmup 200 train.compile=true
  python $t data.root="$data" --repeats 1 --sample_n 0 train.batch_size=2048
  # CelebA 64x64 on the 10,000 faces: JPEGs decoded by DataLoader workers, then the decode-once cache
  local w="data.num_workers=${CELEBA_WORKERS:-8}"
  python $t -c configs/celeba.yaml data.root="$celeba" $w --repeats 1 --sample_n 0 --json "$out/throughput-celeba.json"
  python $t -c configs/celeba.yaml data.root="$celeba" $w data.cache=true --repeats 1 --sample_n 0 \
    --json "$out/throughput-celeba-cache.json"
  python $t --loader -c configs/celeba.yaml data.root="$celeba" $w --steps 100 --warmup 20 --window 20
  python $t --loader -c configs/celeba.yaml data.root="$celeba" $w data.cache=true --steps 200 --warmup 20 --window 20
}

stage_celeba() {
  local run="$scratch/celeba" t0=$SECONDS
  rm -rf "$run"
  # as long as the time allows: SIGINT makes the trainer checkpoint the step it is at and exit (130)
  timeout -s INT -k 120 "${CELEBA_TRAIN_S:-150}" python train_vae.py -c configs/celeba.yaml -e "$run" \
    data.root="$celeba" data.cache=true
  local step
  step=$(ls "$run/checkpoints" | sed -n 's/^step_0*\([0-9][0-9]*\)$/\1/p' | sort -n | tail -1)
  [[ -f "$run/model.safetensors" ]] || python train_vae.py -r latest -e "$run" train.steps="$step" || return 1
  echo "celeba: $step steps in $((SECONDS - t0)) s (start-up, cache and checkpoints included)"
  local g="$out/celeba"
  python sample.py --exp_dir "$run" --mode sample --save_dir "$g" --n_samples 64
  python sample.py --exp_dir "$run" --mode reconstruct --save_dir "$g" --n_samples 32
  python sample.py --exp_dir "$run" --mode interpolate --save_dir "$g" --n_pairs 4 --interp slerp
  python sample.py --exp_dir "$run" --mode traverse --save_dir "$g" --n_dims 8 --n_traverse 9
  cp "$run/config.yaml" "$out/celeba-config.yaml"; cp "$run/metrics.jsonl" "$out/celeba-metrics.jsonl"
  python evaluate.py --exp_dir "$run" --metrics elbo,nll,au,recon --k 1000 --out "$out/celeba-eval.json"
}

stage_iwae() {
  local runs=${IWAE_RUNS:-$(ls -d runs/binarized-mnist-*/ 2>/dev/null)}
  for run in $runs; do
    [[ -f "$run/model.safetensors" ]] || continue
    local name t0=$SECONDS
    name=$(basename "$run")
    python evaluate.py --exp_dir "$run" --data_root "$data" --binarize --metrics elbo,nll,au --k 5000 \
      --out "$out/iwae-$name.json" &&
    echo "$name: evaluate.py --k 5000 on 10,000 test images in $((SECONDS - t0)) s"
  done
}

export -f stage_env stage_check stage_tests stage_throughput stage_celeba stage_iwae
export data out scratch celeba
declare -A limit=([env]=60 [check]=240 [tests]=300 [throughput]=300 [celeba]=360 [iwae]=240)
for s in "${stages[@]}"; do
  [[ -n "${limit[$s]:-}" ]] || { echo "unknown stage $s" >&2; exit 2; }
  var="${s^^}_S"
  t0=$SECONDS
  # the stage in its own process group, so the time limit stops everything it started
  timeout -s INT -k 30 "${!var:-${limit[$s]}}" bash -c "stage_$s" > "$out/$s.log" 2>&1
  echo "stage $s: exit $? in $((SECONDS - t0)) s (log $out/$s.log)"
done
