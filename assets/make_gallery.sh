#!/usr/bin/env bash
# Rebuilds every image in assets/ from real training runs, with the toolkit's own commands.
# CPU is enough (about 10 minutes on 2 cores). DATA_ROOT: the folder holding MNIST/raw (default data).
# It overwrites the committed images in assets/ (mnist_vae*, mnist_*_vae, celeba) and
# assets/results/celeba-samplers.json;
# the docs show its commands without --save_dir/--out: pasted, they write into runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${DATA_ROOT:-data}"
timed() { local t0=$SECONDS; "$@" > /dev/null 2>&1 || { echo "failed: $*"; exit 1; }; echo "$((SECONDS - t0)) s: $*"; }

# 1. the quick-start VAE: MLP 784-400-16, Bernoulli, 10,000 steps
timed python train_vae.py -c configs/mnist.yaml -e runs/gallery-mnist data.root="$root"
for mode in sample reconstruct interpolate traverse; do
  python sample.py --exp_dir runs/gallery-mnist --mode "$mode" --save_dir assets/mnist_vae --n_samples 64 \
    --traverse_dim all --seed 0
done

# 2. a 2-D latent space, to plot the latent plane itself
timed python train_vae.py -c configs/mnist.yaml -e runs/gallery-mnist-z2 data.root="$root" model.z_dim=2
python sample.py --exp_dir runs/gallery-mnist-z2 --mode visualize_latent --save_dir assets/mnist_vae_z2

# 3. the point of the toolkit: averaged MSE (implicit beta = 392) against a learned shared sigma
for cfg in mnist_mse_vae mnist_sigma_vae; do
  timed python train_vae.py -c "configs/$cfg.yaml" -e "runs/gallery-$cfg" data.root="$root" train.steps=3000
  python sample.py --exp_dir "runs/gallery-$cfg" --mode sample --save_dir "assets/$cfg" --n_samples 64
  python sample.py --exp_dir "runs/gallery-$cfg" --mode reconstruct --save_dir "assets/$cfg" --n_samples 32
done

# 4. CelebA 64x64 (configs/celeba.yaml as shipped: optimal sigma, batch 128), the 10,000 faces for about 90 minutes
# of the 2-core CPU (STEPS steps; resumable: -r latest -e runs/gallery-celeba train.steps=N), then prior samples
# beside samples from the two ex-post samplers fitted to the training codes, and the samplers' offline numbers.
# CELEBA_ROOT: the folder holding img_align_celeba/ (default data/celeba)
celeba="${CELEBA_ROOT:-data/celeba}"
timed python train_vae.py -c configs/celeba.yaml -e runs/gallery-celeba data.root="$celeba" data.cache=true \
  train.log_with=none train.steps=4792
python sample.py --exp_dir runs/gallery-celeba --mode reconstruct --save_dir assets/celeba --n_samples 32
for sampler in prior gmm two_stage; do
  python sample.py --exp_dir runs/gallery-celeba --mode sample --save_dir assets/celeba --n_samples 64 \
    --sampler "$sampler"
done
for sampler in prior gmm; do
  python sample.py --exp_dir runs/gallery-celeba --mode interpolate --save_dir assets/celeba --n_pairs 4 \
    --interp slerp --sampler "$sampler"
done
python sample.py --exp_dir runs/gallery-celeba --mode traverse --save_dir assets/celeba --n_dims 8 --n_traverse 9
python evaluate.py --exp_dir runs/gallery-celeba --metrics elbo,recon,samplers --out assets/results/celeba-samplers.json
