#!/usr/bin/env bash
# Reruns the sharper-decoder study of docs/results.md with the toolkit's own commands: six rows on the shared
# CelebA faces at one budget (STEPS steps at batch 32, default 1000: celeba_klae.yaml's own), each trained on one
# thread, one at a time:
# the sigma-VAE as shipped; + focal frequency; + Watson-DFT; + a PatchGAN from half-way; the KL autoencoder
# (diffusers' AutoencoderKL networks, spatial latents), and the same without its PatchGAN. Then on the 500
# held-out faces: the likelihood's bound,
# the reconstructions' PSNR, SSIM and MS-SSIM, their quality scores in the faces' own feature network, the scores
# of gmm samples where the latent is flat, and a grid of the same test faces reconstructed by each row.
# DATA_ROOT: the folder holding celeba-10k/. ROWS: which rows (default all). A stopped run resumes where it was.
# The feature network is features/celeba.safetensors (assets/make_quality.sh SECTIONS=features makes it).
# It overwrites the committed files in assets/results/sharp-*.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${DATA_ROOT:-data}"
steps="${STEPS:-1000}"
rows="${ROWS:-sigma focal watson patchgan klae klae_nogan}"
features=features/celeba.safetensors
row_args() {
  case $1 in
    sigma) echo "-c configs/celeba_sigma_vae.yaml" ;;
    focal) echo "-c configs/celeba_sigma_vae_perceptual.yaml" ;;
    watson) echo "-c configs/celeba_sigma_vae.yaml loss.watson_dft=0.001" ;;
    patchgan) echo "-c configs/celeba_sigma_vae.yaml loss.disc_weight=0.5 loss.disc_layers=2 loss.disc_start=$((steps / 2))" ;;
    klae) echo "-c configs/celeba_klae.yaml loss.disc_start=$((steps / 2))" ;;
    klae_nogan) echo "-c configs/celeba_klae.yaml loss.disc_weight=0" ;;
  esac
}
for row in $rows; do
  run="runs/sharp-$row"
  t0=$SECONDS
  if [[ -f "$run/model.safetensors" ]]; then
    :  # trained already
  elif [[ -d "$run/checkpoints" ]]; then
    python train_vae.py -r latest -e "$run"
  else
    python train_vae.py $(row_args "$row") -e "$run" data.root="$root/celeba-10k" data.cache=true \
      train.steps="$steps" train.batch_size=32 train.threads=1 train.log_with=none train.sample_every=0 \
      train.eval_every=0 train.save_every=100
  fi
  echo "$row: trained in $((SECONDS - t0)) s"
  t0=$SECONDS
  python evaluate.py --exp_dir "$run" --metrics elbo,recon,recon_quality --features "$features" --threads 1 \
    --out "assets/results/sharp-$row.json"
  [[ $row == klae* ]] || python evaluate.py --exp_dir "$run" --metrics quality --sampler gmm --features "$features" \
    --threads 1 --out "assets/results/sharp-$row-gmm.json"
  echo "$row: evaluated in $((SECONDS - t0)) s"
  python sample.py --exp_dir "$run" --mode reconstruct --save_dir "assets/results/sharp-$row"
done
