"""The model's own config sections: ``model`` (the VAE and its parts) and ``loss`` (the objective).

They stand beside the parts that read them, as nanoGPT's ``GPTConfig`` stands beside ``GPT``. A key
that names a part (``model.net``, ``loss.regulariser``, ...) takes its choices from that part's
registry; ``utils/config.py`` binds the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.fields import opt


@dataclass
class ModelConfig:
    net: str = opt("mlp", "encoder/decoder network")
    z_dim: int = opt(16, "size of the latent code z", min=1, max=4096)
    likelihood: str = opt("bernoulli", "decoder likelihood p(x|z)")
    sigma: float = opt(1.0, "fixed decoder std for likelihood=gaussian", min=0.0, min_exclusive=True)
    prior: str = opt("normal", "prior p(z): normal is N(0, I), vamp the VampPrior (Tomczak & Welling 2018)")
    vamp_components: int = opt(500, "prior=vamp: pseudo-inputs K (the paper's 500 for MNIST)", min=1)
    hidden: list[int] = opt([400], "mlp: units of each hidden layer, encoder order (the classic 784-400-z); "
                                   "the decoder mirrors them. ladder, ladder_conv: the width of each stochastic "
                                   "layer's two dense layers, bottom first, one per entry of latent_dims")
    latent_dims: list[int] = opt([], "ladder, ladder_conv: sizes of the L stochastic layers, bottom first (Sønderby "
                                     "et al. 2016: [64, 32, 16, 8, 4]); the last is the prior's z, model.z_dim "
                                     "([]: one layer, z_dim)")
    activation: str = opt("relu", "mlp, resconv: activation between layers")
    base_width: int = opt(32, "conv, resconv: channels of the first conv layer", min=1)
    channel_mults: list[int] = opt([1, 2, 4], "conv, resconv: width multipliers, one per 4x4 stride-2 layer")
    res_blocks: int = opt(1, "resconv: residual blocks at each resolution", min=0, max=64)
    conditional: bool = opt(False, "a conditional VAE (Sohn et al. 2015): encoder and decoder also see the image's "
                                   "class label, one-hot; needs a data set with labels")
    n_classes: int = opt(0, "conditional: number of classes (0: from the data set's labels, filled in when the "
                            "config is resolved)", min=0)
    latent_channels: int = opt(4, "klae: channels C of the latent map C x H/f x W/f (Stable Diffusion's 4); "
                                  "model.z_dim must be C·(H/f)·(W/f)", min=1, max=256)
    block_channels: list[int] = opt([32, 64, 64], "klae: width of each down block, encoder order (Stable Diffusion's "
                                              "[128, 256, 512, 512]); every block but the last halves the image, so "
                                              "f = 2^(blocks - 1)")
    layers_per_block: int = opt(1, "klae: ResNet blocks in each down block (the decoder has one more; SD's 2)",
                                min=1, max=16)
    norm_groups: int = opt(32, "klae: groups of the group norms; every entry of block_channels divides by it",
                           min=1, max=4096)
    init_from: str = opt("", "klae: a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model."
                             "safetensors) whose weights a fresh run starts from; its config must match the "
                             "model's ('': random initialisation)")


@dataclass
class LossConfig:
    objective: str = opt("elbo", "elbo (one reparameterised sample per image), iwae (importance-weighted bound "
                                 "with loss.k samples) or ae (a deterministic autoencoder: z is the posterior "
                                 "mean, no KL)")
    k: int = opt(1, "objective=iwae: importance samples per image (Burda et al. 2016: 5 or 50)", min=1, max=5000)
    regulariser: str = opt("kl", "latent term: kl (beta * KL), mmd (beta * KL + mmd_weight * MMD, InfoVAE), tcvae "
                                 "(KL + (beta - 1) * total correlation), factorvae (beta * KL + factor_gamma * "
                                 "critic's TC), dip_i or dip_ii (beta * KL + DIP penalty), aae (beta * KL + "
                                 "aae_weight * adversarial loss, with objective=ae the AAE), none (nothing: with "
                                 "objective=ae the plain AE)")
    beta: float = opt(1.0, "weight of KL(q(z|x) || p(z)); beta != 1 is a beta-VAE", min=0.0)
    kl_warmup_steps: int = opt(0, "linear KL warm-up from 0 to beta over this many steps (0: off)", min=0)
    free_bits: float = opt(0.0, "objective=elbo: free bits (Kingma et al. 2016), nats each stochastic layer keeps "
                                "without penalty: a layer's batch-mean KL below it is not pushed down (0: off)",
                           min=0.0)
    kl_balance: bool = opt(False, "objective=elbo, two or more stochastic layers: KL balancing (Vahdat & Kautz "
                                  "2020): during the KL warm-up each layer's KL is weighted by its share of the "
                                  "KL per latent unit, so no layer collapses early; needs kl_warmup_steps")
    mmd_weight: float = opt(0.0, "regulariser=mmd: weight of MMD(q(z) || p(z)), > 0", min=0.0)
    mmd_kernel: str = opt("imq", "regulariser=mmd: inverse multiquadric or RBF kernel")
    tc_estimator: str = opt("mss", "regulariser=tcvae: minibatch-stratified or minibatch-weighted sampling "
                                   "(Chen et al. 2018)")
    tc_dataset_size: int = opt(0, "regulariser=tcvae: training images N in the estimator (0: the training set's "
                                  "size, filled in when the config is resolved)", min=0)
    factor_gamma: float = opt(10.0, "regulariser=factorvae: weight of the critic's total correlation estimate "
                                    "(disentanglement_lib sweeps 10-100)", min=0.0)
    factor_critic_hidden: list[int] = opt([1000] * 6, "regulariser=factorvae: the critic's hidden layers (the "
                                                      "paper's 6 x 1000)")
    factor_critic_lr: float = opt(1e-4, "regulariser=factorvae: the critic's Adam learning rate (the paper's)",
                                  min=0.0, min_exclusive=True)
    dip_lambda_od: float = opt(10.0, "regulariser=dip_i, dip_ii: weight of the off-diagonal covariance penalty",
                               min=0.0)
    dip_lambda_d: float = opt(100.0, "regulariser=dip_i, dip_ii: weight of the diagonal penalty (Kumar et al.: "
                                     "10 x dip_lambda_od for dip_i, 1 x for dip_ii)", min=0.0)
    aae_weight: float = opt(1.0, "regulariser=aae: weight of the encoder's adversarial loss (about 70 nats of "
                                 "reconstruction sit beside it on MNIST; 10 and up make the codes oscillate)",
                            min=0.0, min_exclusive=True)
    aae_hidden: list[int] = opt([1000, 1000], "regulariser=aae: the discriminator's hidden layers (the paper's "
                                              "2 x 1000)")
    aae_lr: float = opt(1e-4, "regulariser=aae: the discriminator's Adam learning rate", min=0.0,
                        min_exclusive=True)
    disc_weight: float = opt(0.0, "objective=elbo, ae: weight of a PatchGAN discriminator's adversarial term on the "
                                  "reconstructions (Esser et al. 2021), times the adaptive weight that balances its "
                                  "gradient against the reconstruction term's (0: off; taming uses 0.8)", min=0.0)
    disc_start: int = opt(0, "disc_weight > 0: the step from which the adversarial term is on and the discriminator "
                             "trains (before it, neither)", min=0)
    disc_loss: str = opt("hinge", "disc_weight > 0: the discriminator's loss, hinge or non_saturating (the GAN's "
                                  "cross-entropy)", choices=("hinge", "non_saturating"))
    disc_lr: float = opt(1e-4, "disc_weight > 0: the discriminator's Adam learning rate", min=0.0,
                         min_exclusive=True)
    disc_layers: int = opt(3, "disc_weight > 0: the discriminator's stride-2 layers (3: 70x70 px patches, 2: 34, "
                              "1: 16; the patch must fit in the image)", min=1, max=6)
    disc_channels: int = opt(64, "disc_weight > 0: channels of the discriminator's first layer", min=1, max=1024)
    focal_frequency: float = opt(0.0, "weight of the focal frequency loss (Jiang et al. 2021), a sharpening term "
                                      "beside the likelihood: the loss adds weight x pixels x term "
                                      "(models/perceptual.py; 0: off)", min=0.0)
    ms_ssim: float = opt(0.0, "weight of 1 - MS-SSIM (scales fitted to the image size), added as focal_frequency",
                         min=0.0)
    watson_dft: float = opt(0.0, "weight of Watson's DFT perceptual distance (Czolbe et al. 2020), added as "
                                 "focal_frequency", min=0.0)
    lpips: float = opt(0.0, "weight of LPIPS (Zhang et al. 2018), added as focal_frequency; needs "
                            "loss.lpips_weights", min=0.0)
    lpips_net: str = opt("vgg", "lpips: the backbone, torchvision's vgg16 or alexnet")
    lpips_weights: str = opt("", "lpips: the backbone's ImageNet weights file (vgg16-397923af.pth or "
                                 "alexnet-owt-7be5be79.pth; never downloaded)")
