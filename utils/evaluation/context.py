"""What every metric of ``METRICS`` (utils/evaluation/metrics.py) reads: ``Evaluation``, the model, the held-out
split, the processes, ``evaluate.py``'s options and the results so far, with the passes that several metrics
share (the bounds; active units and reconstruction). Imported once the arguments are checked: it loads torch."""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any

from accelerate import Accelerator
from tqdm import tqdm

from models.samplers import Sampler
from models.vae import VAE
from utils.data.registry import load_data
from utils.data.splits import ImageSplit
from utils.evaluation.bounds import fix_optimal_sigma, latent_usage, likelihood_bounds
from utils.evaluation.samplers import fitted_sampler


@dataclass
class Evaluation:
    """What every metric reads: the model, the held-out split, the processes, the options, and the results so
    far (``results``, written to eval.json)."""

    vae: VAE
    test: ImageSplit
    accelerator: Accelerator
    options: Namespace  # evaluate.py's parsed options: k, n_test, batch_size, seed, fid_*, dis_*, sampler_options, ..
    results: dict[str, Any]
    k: int = 1  # importance samples of the bounds' pass: --k when a metric asked for takes it (the NLL)
    _cache: dict[str, Any] = field(default_factory=dict)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not self.accelerator.is_main_process, mininterval=2.0)

    def bounds(self) -> dict[str, Any]:
        """ELBO and IWAE bound in one pass (``k`` importance samples); optimal σ fixed first."""
        if "bounds" not in self._cache:
            o = self.options
            self.results["sigma"] = fix_optimal_sigma(self.vae, self.test, o.batch_size, self.accelerator, o.n_test)
            k = self.k
            n = len(self.test) if o.n_test <= 0 else min(o.n_test, len(self.test))
            with self.bar(n, f"ELBO and IWAE (k={k})") as bar:
                self._cache["bounds"] = likelihood_bounds(self.vae, self.test, k, self.accelerator, o.batch_size,
                                                          limit=o.n_test, seed=o.seed, binarize=o.binarize,
                                                          progress=bar)
        return self._cache["bounds"]

    def train(self) -> ImageSplit:
        """The training split (read once, on first use: the fitted samplers need its codes)."""
        if "train" not in self._cache:
            cfg = self.vae.config.data
            self._cache["train"] = load_data(cfg, cfg.num_workers)[0].to(self.accelerator.device)
        return self._cache["train"]

    def sampler(self, name: str) -> Sampler:
        """The sampler ``name``: the prior, or kept in the model's folder, or fitted now (and kept)."""
        o = self.options
        return fitted_sampler(self.vae, self.vae.sampler_folder, name, self.train, o.sampler_options, o.refit,
                              self.accelerator.device)

    def usage(self) -> dict[str, Any]:
        """Active units, per-dimension KL and reconstruction error, in one pass."""
        if "usage" not in self._cache:
            o = self.options
            self._cache["usage"] = latent_usage(self.vae, self.test, self.accelerator, o.batch_size, o.n_test)
        return self._cache["usage"]
