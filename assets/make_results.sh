#!/usr/bin/env bash
# Produces the numbers and images of the Results in docs/results.md, with the toolkit's own commands.
# CPU is enough (about 45 minutes on 2 cores). DATA_ROOT: the folder holding MNIST/raw and FashionMNIST/raw.
# It overwrites the committed files in assets/results/;
# the docs show its commands without --save_dir/--out: pasted, they write into runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${DATA_ROOT:-data}"
timed() { local t0=$SECONDS; "$@" > /dev/null 2>&1 || { echo "failed: $*"; exit 1; }; echo "$((SECONDS - t0)) s: $*"; }
sections="${SECTIONS:-1 2 3}"  # e.g. SECTIONS="2 3" to redo only those

# 1. The sigma-VAE comparison: one network (MLP 784-400-16), one budget (10,000 steps at batch 128),
#    five decoders; test ELBO and IWAE NLL (k=100) on the full test sets, dequantised, in bits/dim.
[[ " $sections " == *" 1 "* ]] && for data in mnist fashion_mnist; do
  for lik in mse gaussian sigma optimal_sigma per_pixel_sigma; do
    run="runs/results-$data-$lik"
    timed python train_vae.py -c configs/mnist.yaml -e "$run" data.name="$data" data.root="$root" \
      model.likelihood="$lik" train.steps=10000 train.sample_every=0 train.eval_every=0 train.save_every=0
    timed python evaluate.py --exp_dir "$run" --k 100 --out "assets/results/$data-$lik.json"
    python sample.py --exp_dir "$run" --mode sample --n_samples 16 --save_dir "assets/results/$data-$lik" > /dev/null
  done
done

# 2. A beta sweep on dSprites (procedural renderer): the MLP of Higgins et al. (hidden 1200), z=10,
#    5,000 steps at batch 64; the three disentanglement scores at reduced sample sizes (flags below).
[[ " $sections " == *" 2 "* ]] && for beta in 1 4 16; do
  run="runs/results-dsprites-beta$beta"
  timed python train_vae.py -c configs/dsprites.yaml -e "$run" data.root="$root" model.net=mlp model.hidden=1200 \
    loss.beta="$beta" train.steps=5000 train.sample_every=0 train.eval_every=0 train.save_every=0
  timed python evaluate.py --exp_dir "$run" --k 10 --n_test 2000 --dis_train 2000 --dis_eval 1000 \
    --dis_variance 5000 --mig_samples 5000 --out "assets/results/dsprites-beta$beta.json"
  python sample.py --exp_dir "$run" --mode traverse --n_traverse 9 --save_dir "assets/results/dsprites-beta$beta" \
    > /dev/null
done

# 3. Binarised MNIST: the default VAE trained on dynamically binarised digits, IWAE with k=1000.
[[ " $sections " == *" 3 "* ]] || exit 0
timed python train_vae.py -c configs/mnist.yaml -e runs/results-binarized data.root="$root" data.binarize=true \
  train.sample_every=0 train.eval_every=0 train.save_every=0
timed python evaluate.py --exp_dir runs/results-binarized --binarize --k 1000 --out assets/results/binarized-mnist.json
