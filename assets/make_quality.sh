#!/usr/bin/env bash
# Produces the sample-quality study of docs/results.md with the toolkit's own commands: a feature network per
# data set, six families trained on MNIST, Fashion-MNIST and the 10,000 CelebA faces, and each family's samples
# (prior, gmm, two_stage) and reconstructions scored in that network's features.
# CPU is enough (about 2 hours on 2 cores). The ranking's flows: SAMPLERS="flow flow_matching" FAMILIES="sigma_vae ae".
# DATA_ROOT: the folder holding MNIST/raw, FashionMNIST/raw and celeba-10k/ (default data). It overwrites assets/results/quality-*.json;
# the docs show its commands without --out: pasted, they write into the run's own eval.json.
# SECTIONS picks what to redo (default "features train eval grids"); DATASETS which data sets (default all three);
# FAMILIES and SAMPLERS which rows (default all six families; prior, gmm and two_stage);
# JOBS how many trainings or evaluations run side by side (default 2, each on one thread).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${DATA_ROOT:-data}"
sections="${SECTIONS:-features train eval grids}"
datasets="${DATASETS:-mnist fashion_mnist celeba}"
jobs="${JOBS:-2}"
log="runs/quality-logs"
mkdir -p "$log" assets/results
timed() { local t0=$SECONDS name=$1; shift; "$@" > "$log/$name.log" 2>&1 || { echo "failed: $*"; return 1; }
          echo "$((SECONDS - t0)) s: $*"; }
throttle() { while (( $(jobs -rp | wc -l) >= jobs )); do wait -n; done; }

families="${FAMILIES:-vae beta_vae mmd_vae sigma_vae ae aae}"
samplers_asked="${SAMPLERS:-prior gmm two_stage}"  # also flow, flow_matching
base_rows=$([[ " $samplers_asked " == *" prior "* ]] && echo 1 || true)  # the floor and reconstructions with prior
# what each family changes in the data set's base config (below); the others keep the Bernoulli decoder
family() {  # $1 family, $2 mmd's weight, $3 the KL warm-up of beta-VAE, $4 aae's weight
  case $1 in
    vae) echo "" ;;
    beta_vae) echo "loss.beta=4 loss.kl_warmup_steps=$3" ;;
    mmd_vae) echo "loss.regulariser=mmd loss.beta=0 loss.mmd_weight=$2" ;;
    sigma_vae) echo "model.likelihood=optimal_sigma" ;;
    ae) echo "loss.objective=ae loss.regulariser=none" ;;
    aae) echo "loss.objective=ae loss.regulariser=aae loss.aae_weight=$4" ;;
  esac
}
# the base of each data set: MNIST's MLP 784-400-16 for the digits (10,000 steps at batch 128); celeba.yaml's conv
# net (z = 128) with a Bernoulli decoder for the faces, 1,000 steps at batch 64 (about 7 epochs of 9,500 faces).
# The regulariser weights of mmd and aae are the shipped MNIST configs' (100, and 1: the AAE's default), scaled by
# the pixel count for faces.
base() {
  case $1 in
    mnist | fashion_mnist) echo "-c configs/mnist.yaml data.name=$1 data.root=$root|100|2000|1" ;;
    celeba) echo "-c configs/celeba.yaml data.root=$root/celeba-10k data.cache=true model.likelihood=bernoulli \
train.batch_size=64 train.steps=1000|1500|200|15" ;;
  esac
}
features() { echo "features/$1.safetensors"; }

if [[ " $sections " == *" features "* ]]; then
  for data in $datasets; do
    throttle
    if [[ $data == celeba ]]; then
      timed "features-$data" python -m utils.inference.features -c configs/celeba.yaml --data_root "$root/celeba-10k" \
        --steps 300 --seed 0 --out "$(features "$data")" &
    else
      timed "features-$data" python -m utils.inference.features -c "configs/$data.yaml" \
        --data_root "$root" --seed 0 --out "$(features "$data")" &
    fi
  done
  wait
fi

if [[ " $sections " == *" train "* ]]; then
  for data in $datasets; do
    IFS='|' read -r args weight warmup aae_weight <<< "$(base "$data")"
    for fam in $families; do
      throttle
      # shellcheck disable=SC2046,SC2086
      timed "train-$data-$fam" python train_vae.py $args -e "runs/quality-$data-$fam" $(family "$fam" "$weight" "$warmup" "$aae_weight") \
        train.threads=1 train.log_with=none train.sample_every=0 train.eval_every=0 train.save_every=0 &
    done
  done
  wait
fi

# CelebA's held-out split has 500 faces: its scores compare 500 against 500 (KID in subsets of 250, the default)
if [[ " $sections " == *" eval "* ]]; then
  for data in $datasets; do
    # the floor: as many real training images as there are held-out ones, scored as a model's samples are
    n=$([[ $data == celeba ]] && echo 500 || echo 10000)
    if [[ $base_rows ]]; then
      throttle
      timed "floor-$data" python benchmarks/quality.py -c "configs/$data.yaml" \
        --data_root "$root$([[ $data == celeba ]] && echo /celeba-10k)" --features "$(features "$data")" \
        --n "$n" --out "assets/results/quality-$data-floor.json" &
    fi
    for fam in $families; do
      run="runs/quality-$data-$fam"
      samplers="$samplers_asked"
      [[ $fam == ae ]] && samplers="${samplers/prior/}"  # a plain autoencoder has no prior to draw from
      if [[ $base_rows ]]; then
        throttle
        timed "eval-$data-$fam-recon" python evaluate.py --exp_dir "$run" --metrics recon_quality \
          --features "$(features "$data")" --threads 1 --out "assets/results/quality-$data-$fam-recon.json" &
      fi
      for sampler in $samplers; do
        throttle
        timed "eval-$data-$fam-$sampler" python evaluate.py --exp_dir "$run" --metrics quality --sampler "$sampler" \
          --features "$(features "$data")" --threads 1 \
          --out "assets/results/quality-$data-$fam-$sampler.json" &
      done
    done
  done
  wait
fi

# one row of 8 images per family and sampler, and 8 reconstructions, for the faces; and the samplers' older
# offline numbers (held-out codes' log-density, the KDE of draws) on the sigma-VAE, to set beside the new ranking
if [[ " $sections " == *" grids "* && " $datasets " == *" celeba "* ]]; then
  for fam in $families; do
    run="runs/quality-celeba-$fam"
    samplers="prior gmm two_stage"
    [[ $fam == ae ]] && samplers="gmm two_stage"
    for sampler in $samplers; do
      python sample.py --exp_dir "$run" --mode sample --n_samples 8 --sampler "$sampler" --seed 0 \
        --save_dir "assets/results/quality-celeba-$fam" > /dev/null
    done
    python sample.py --exp_dir "$run" --mode reconstruct --n_samples 8 --save_dir "assets/results/quality-celeba-$fam" \
      > /dev/null
  done
  for sampler in flow flow_matching; do  # the ranking's gallery row: the sigma-VAE's codes from each flow
    python sample.py --exp_dir runs/quality-celeba-sigma_vae --mode sample --n_samples 8 --sampler "$sampler" --seed 0 \
      --save_dir assets/results/quality-celeba-sigma_vae > /dev/null
  done
  timed samplers-celeba python evaluate.py --exp_dir runs/quality-celeba-sigma_vae --metrics samplers --threads 2 \
    --out assets/results/quality-celeba-samplers.json
fi
