#!/usr/bin/env bash
# Reruns the dSprites study of docs/results.md with the toolkit's own commands: VAE, beta-VAE, beta-TCVAE, FactorVAE and
# DIP-VAE-I, each its configs/dsprites*.yaml (the disentanglement literature's 64x64 conv net) for the same number
# of steps on one CPU core (OMP_NUM_THREADS=1, so two rows can share a 2-core machine), then every score at
# reduced sample sizes (flags below), the same scores at the step-1000 checkpoint, and a latent traversal.
# STEPS: steps per run (default 2000). ROWS: which rows.
# It overwrites the committed files in assets/results/dsprites-study-*;
# the docs show its commands without --save_dir/--out: pasted, they write into runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-2000}"
rows="${ROWS:-vae beta_vae tcvae factor_vae dip_vae}"
for row in $rows; do
  config="configs/dsprites_$row.yaml"
  [[ $row == vae ]] && config="configs/dsprites.yaml"
  run="runs/dsprites-study-$row"
  t0=$SECONDS
  if [[ ! -f "$run/model.safetensors" ]]; then  # the same KL warm-up (a quarter of the run) for every row
    OMP_NUM_THREADS=1 python train_vae.py -c "$config" -e "$run" train.steps="$steps" train.log_every=500 \
      loss.kl_warmup_steps=$((steps / 4)) train.sample_every=0 train.eval_every=0 train.save_every=1000 \
      > /dev/null 2>&1
  fi
  echo "$row: trained $steps steps in $((SECONDS - t0)) s"
  t0=$SECONDS
  OMP_NUM_THREADS=1 python evaluate.py --exp_dir "$run" --k 10 --n_test 2000 --dis_train 1000 --dis_eval 500 \
    --dis_variance 5000 --mig_samples 5000 --dci_train 1000 --dci_test 500 \
    --out "assets/results/dsprites-study-$row.json" > /dev/null 2>&1
  echo "$row: evaluated in $((SECONDS - t0)) s"
  OMP_NUM_THREADS=1 python evaluate.py -c "$run/config.yaml" --weights "$run/checkpoints/step_0001000/model.safetensors" \
    --metrics disentanglement --dis_train 1000 --dis_eval 500 --dis_variance 5000 --mig_samples 5000 \
    --dci_train 1000 --dci_test 500 --out "assets/results/dsprites-study-$row-step1000.json" > /dev/null 2>&1
  OMP_NUM_THREADS=1 python sample.py --exp_dir "$run" --mode traverse --n_traverse 9 \
    --save_dir "assets/results/dsprites-study-$row" > /dev/null
done
