"""Reconstruction terms that sharpen the decoder, chosen by their weights ``loss.<name>`` (0: off).

A Gaussian or Bernoulli likelihood scores each pixel on its own, so a decoder unsure where an edge lies
hedges with a blur. These terms score images as wholes, in frequency or by structure, and are added to the
training loss beside the likelihood. They are not part of log p(x): the reported ELBO and NLL stay the
likelihood's bound, and a run is compared with others on that bound.

Each term is an ``nn.Module`` mapping images x and the decoder's mean x̂, both (B, C, H, W) in [0, 1], to a
per-image value (B,) in fp32, of the size of a per-pixel mean (0 for x̂ = x). **Scale**: the loss adds
``weight · D · term`` with D = C·H·W the number of pixel values, as latent-diffusion's LPIPS sits inside a
per-pixel sum. A weight of 1 then counts the term as much as one nat per pixel value in the likelihood's nats
per image: a σ-VAE's Gaussian NLL changes by about D·Δ(MSE)/(2σ²), so weight w weighs the term against the
squared error as w against 1/(2σ²) (σ = 0.1: 50).

    focal_frequency  focal frequency loss (Jiang et al. 2021, ICCV)
    ms_ssim          1 − MS-SSIM (Wang, Simoncelli & Bovik 2003), scales fitted to the image size
    watson_dft       Watson's perceptual distance on the DFT (Czolbe et al. 2020, NeurIPS)
    lpips            LPIPS (Zhang et al. 2018, CVPR) with the user's VGG16 or AlexNet weights
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.lpips import LPIPS
from models.objective_rules import perceptual_on
from utils.errors import UserError

if TYPE_CHECKING:
    from models.config import LossConfig

# MS-SSIM's five scale weights (Wang et al. 2003), finest first
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW = 11  # the Gaussian window of SSIM (σ = 1.5)


def ms_ssim_scales(h: int, w: int) -> int:
    """How many of MS-SSIM's five scales an h×w image affords (0: too small for one 11-px window).

    Scale n halves the image n − 1 times, and the window must still fit: min(h, w) > 10·2^(n−1) (5 scales need
    161 px). torchmetrics also asks min(h, w) // max(1, n − 1)² > 10, stricter at 81–98 px and 161–175 px."""
    side = min(h, w)
    n = 0
    for k in range(1, len(MS_SSIM_BETAS) + 1):
        if side > (WINDOW - 1) * 2 ** (k - 1) and side // max(1, k - 1) ** 2 > WINDOW - 1:
            n = k
    return n


def ms_ssim(x: torch.Tensor, x_hat: torch.Tensor, scales: int) -> torch.Tensor:
    """MS-SSIM per image (B,), data range 1, with ``scales`` scales and the first betas renormalised to sum 1;
    one scale is SSIM. Each scale's contrast-structure term is clamped at 0 (torchmetrics' ``normalize="relu"``),
    so a fractional power of a negative value cannot make NaN; where all are positive this is the standard
    value."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

    betas = MS_SSIM_BETAS[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    return msssim(x_hat, x, data_range=1.0, kernel_size=WINDOW, betas=betas, normalize="relu", reduction="none")


class Term(nn.Module):
    """One term; built from the images' shape (C, H, W) and the loss config (only LPIPS reads its keys)."""

    log_name = ""  # the key under which the objective logs it

    def __init__(self, img_shape: tuple[int, int, int], loss: LossConfig):
        super().__init__()


class FocalFrequency(Term):
    """Focal frequency loss (Jiang, Dai, Wu & Loy 2021, "Focal Frequency Loss for Image Reconstruction and
    Synthesis", ICCV), α = 1, no patches, no log and no batch statistics (the authors' defaults):

        FFL = mean_{c,u,v} w(u,v) · |F̂(u,v) − F(u,v)|²,   w = |F̂ − F|^α / max_{u,v} |F̂ − F|^α  (detached)

    with F the orthonormal 2-D DFT of each channel, and the max over each image's channel (so an image's term
    does not depend on its batch mates). The weight focuses the loss on the frequencies that are worst
    reconstructed: the high ones, which a blurry decoder loses. Its gradient flows through |F̂ − F|² only."""

    log_name = "ffl"

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        diff = torch.fft.fft2(x_hat, norm="ortho") - torch.fft.fft2(x, norm="ortho")
        dist = diff.real ** 2 + diff.imag ** 2
        spectrum = dist.detach().sqrt()  # |F̂ − F|^α, α = 1
        weight = spectrum / spectrum.amax((-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return (weight * dist).mean((1, 2, 3))


class MSSSIM(Term):
    """1 − MS-SSIM (Wang, Simoncelli & Bovik 2003, "Multiscale structural similarity for image quality
    assessment"), through torchmetrics with gradients, with as many of the five scales as the image size
    allows (``ms_ssim_scales``: 2 at 28 px, 3 at 64 px, 5 from 176 px)."""

    log_name = "ms_ssim"

    def __init__(self, img_shape: tuple[int, int, int], loss: LossConfig):
        super().__init__(img_shape, loss)
        self.scales = ms_ssim_scales(*img_shape[1:])
        if self.scales == 0:
            raise UserError(f"loss.ms_ssim needs images of at least {WINDOW}x{WINDOW} pixels for SSIM's window, "
                            f"and these are {img_shape[1]}x{img_shape[2]}: set loss.ms_ssim=0")

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return 1.0 - ms_ssim(x, x_hat, self.scales)


# Watson's (1993) DCT detection thresholds of an 8x8 block (grey levels 0-255), lowest frequency first
WATSON_DCT = [
    [1.40, 1.01, 1.16, 1.66, 2.40, 3.43, 4.79, 6.56],
    [1.01, 1.45, 1.32, 1.52, 2.00, 2.71, 3.67, 4.93],
    [1.16, 1.32, 2.24, 2.59, 2.98, 3.64, 4.60, 5.88],
    [1.66, 1.52, 2.59, 3.77, 4.55, 5.30, 6.28, 7.60],
    [2.40, 2.00, 2.98, 4.55, 6.15, 7.46, 8.71, 10.17],
    [3.43, 2.71, 3.64, 5.30, 7.46, 9.62, 11.58, 13.51],
    [4.79, 3.67, 4.60, 6.28, 8.71, 11.58, 14.50, 17.29],
    [6.56, 4.93, 5.88, 7.60, 10.17, 13.51, 17.29, 21.15],
]


def watson_dft_thresholds(block: int = 8) -> torch.Tensor:
    """The base thresholds t(u, v) of the DFT's coefficients: DFT index u of a block has |u'| = min(u, 8 − u)
    cycles per 8 px, the frequency of DCT index 2|u'| (k/16 cycles per px), so each takes that DCT threshold
    (the highest DFT frequency, 4 cycles, the DCT's highest, index 7)."""
    idx = [min(2 * min(u, block - u), block - 1) for u in range(block)]
    table = torch.tensor(WATSON_DCT, dtype=torch.float64)
    return table[idx][:, idx]


class WatsonDFT(Term):
    """Watson's perceptual distance on the DFT (Czolbe, Krause, Cox & Igel 2020, "A Loss Function for Generative
    Neural Networks Based on Watson's Perceptual Model", NeurIPS), at its fixed initial parameters (the paper
    learns them on 2AFC judgements; here nothing is trained). On grey levels 0-255, colour as YCbCr (BT.601),
    each channel cut into 8x8 blocks k (rows and columns past a multiple of 8 are left out), F_k(u, v) the
    block's orthonormal DFT of the reference x, F̂_k of x̂:

        luminance masking   t_L(u, v, k) = t(u, v) · (|F_k(0, 0)| / mean_k |F_k(0, 0)|)^α,   α = 0.649
        contrast masking    s(u, v, k) = max(t_L, |F_k(u, v)|^r · t_L^(1 − r)),                 r = 0.7
        pooling             d = (mean_{c,k,u,v} |(F̂_k − F_k)(u, v) / s(u, v, k)|^p)^(1/p),      p = 4

    The constants are Watson's own (his DCT thresholds mapped to DFT frequencies, α and r of his 1993 model), not
    the paper's: the paper learns t, α, r and the pooling exponent on 2AFC judgements and adds a separate phase
    term (weighted angular differences) beside the amplitude term; neither its trained values nor that split are
    reproduced, so this is Watson-DFT's structure at Watson's constants and agrees with no reference number.
    A block's DC enters the luminance masking no lower than that of grey level 1 (``DARKEST``): a black block's
    thresholds would otherwise be 0 and its error infinite. Masking is computed from the reference x, as in
    Watson's model. The difference of complex coefficients
    carries the amplitude and the phase error at once; the mean in place of the paper's sum makes d independent
    of the image size (a per-block Minkowski mean, in units of detection thresholds). ``EPS`` under the root
    keeps the gradient finite at d = 0."""

    log_name = "watson"
    ALPHA, R, P, EPS = 0.649, 0.7, 4.0, 1e-24
    DARKEST = 8.0  # the DC of a block of grey level 1: a black block's thresholds stay above 0 (else s = 0, Δ/0)

    def __init__(self, img_shape: tuple[int, int, int], loss: LossConfig):
        super().__init__(img_shape, loss)
        if min(img_shape[1:]) < 8:
            raise UserError(f"loss.watson_dft compares 8x8 blocks, and these images are {img_shape[1]}x"
                            f"{img_shape[2]}: set loss.watson_dft=0")
        self.register_buffer("t", watson_dft_thresholds().float(), persistent=False)

    @staticmethod
    def blocks(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, K, 8, 8), the image's whole 8x8 blocks on 0-255, YCbCr for colour."""
        x = 255.0 * x
        if x.shape[1] == 3:  # JPEG's full-range YCbCr: Cb and Cr about 128, so a grey block's DC is not 0
            m = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                             dtype=x.dtype, device=x.device)
            offset = torch.tensor([0.0, 128.0, 128.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = torch.einsum("ij,bjhw->bihw", m, x) + offset
        b, c, h, w = x.shape
        x = x[:, :, : h // 8 * 8, : w // 8 * 8]
        return x.unfold(2, 8, 8).unfold(3, 8, 8).reshape(b, c, -1, 8, 8)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        f = torch.fft.fft2(self.blocks(x), norm="ortho")
        f_hat = torch.fft.fft2(self.blocks(x_hat), norm="ortho")
        dc = f[..., 0, 0].abs().clamp_min(self.DARKEST)                   # (B, C, K)
        lum = (dc / dc.mean(-1, keepdim=True).clamp_min(1e-8)) ** self.ALPHA
        t_l = self.t * lum[..., None, None]                               # (B, C, K, 8, 8)
        s = torch.maximum(t_l, f.abs() ** self.R * t_l ** (1 - self.R))
        diff = f_hat - f
        e = ((diff.real ** 2 + diff.imag ** 2) / s ** 2) ** (self.P / 2)  # |Δ/s|^p, smooth at Δ = 0
        m = e.flatten(1).mean(1)
        return (m + self.EPS) ** (1 / self.P) - self.EPS ** (1 / self.P)


TERMS: dict[str, type[Term]] = {
    "focal_frequency": FocalFrequency,
    "ms_ssim": MSSSIM,
    "watson_dft": WatsonDFT,
    "lpips": LPIPS,
}


class Perceptual(nn.Module):
    """The terms a config switches on, with their weights: ``forward(x, mean)`` gives the weighted sum to add to
    the loss (a batch mean, D·Σ w·term) and each term's batch mean to log. Empty (no term) it costs nothing."""

    def __init__(self, loss: LossConfig | None, img_shape: tuple[int, int, int]):
        super().__init__()
        self.weights = {name: float(getattr(loss, name)) for name in ([] if loss is None else perceptual_on(loss))}
        self.terms = nn.ModuleDict({name: TERMS[name](img_shape, loss) for name in self.weights})
        self.d = img_shape[0] * img_shape[1] * img_shape[2]

    def forward(self, x: torch.Tensor, mean: Callable[[], torch.Tensor]) -> tuple[torch.Tensor | float, dict]:
        """``mean``: the decoder's mean x̂ in [0, 1] (called only when a term is on), x the images, both fp32.
        Without a term: 0.0, no tensor (the training step of every other run pays nothing)."""
        if not self.weights:
            return 0.0, {}
        x_hat = mean()
        total, logged = torch.zeros((), device=x.device), {}
        for name, term in self.terms.items():
            value = term(x, x_hat).mean()
            total = total + self.weights[name] * self.d * value
            logged[term.log_name] = value.detach()
        return total, logged
