#!/usr/bin/env bash
# The latent planes of the autoencoder family at z = 2 on MNIST: AE, VAE, AAE and MMD-VAE, each trained from its
# shipped config with only z_dim changed, then the test set's codes coloured by label, side by side, in
# assets/latent_planes.png. CPU is enough (a few minutes each). DATA_ROOT: the folder holding MNIST/raw.
# It overwrites the committed assets/latent_planes.png (its runs go to runs/plane-*).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${DATA_ROOT:-data}"
timed() { local t0=$SECONDS; "$@" > /dev/null 2>&1 || { echo "failed: $*"; exit 1; }; echo "$((SECONDS - t0)) s: $*"; }

for name in ae:mnist_ae vae:mnist aae:mnist_aae mmd_vae:mnist_mmd_vae; do
  timed python train_vae.py -c "configs/${name#*:}.yaml" -e "runs/plane-${name%%:*}" --overwrite \
    data.root="$root" data.download=false model.z_dim=2 train.log_with=none
done
python assets/latent_planes.py runs/plane-ae runs/plane-vae runs/plane-aae runs/plane-mmd_vae \
  --data_root "$root" --out assets/latent_planes.png
