"""What each regulariser states for config validation and resolution, without torch, and the registry of
regularisers, ``REGULARISERS`` (``loss.regulariser``: name -> rules class). A config's rules across parts are
checked, and --dry-run answers, before torch loads; each regulariser's torch class (regularisers.py,
total_correlation.py, adversarial.py) subclasses its rules class here, and ``load()`` returns it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.errors import UserError
from utils.fields import PartRules

if TYPE_CHECKING:
    from collections.abc import Callable

    from models.config import LossConfig


class RegulariserRules(PartRules):
    """β_t · KL, and what a regulariser needs of the run, as class attributes and class methods, so no code
    outside it tests its name: ``plain_kl`` (it is β·KL and nothing more: the IWAE bound can take it),
    ``min_batch`` (it estimates over the batch), ``accumulates`` (its term can be split over micro-batches),
    ``deterministic_ok``, ``matches_prior``, ``trains_prior`` and ``layers_ok`` (below), ``check`` (its keys' rules) and
    ``complete_config`` (values it takes from the training set, when the config is resolved)."""

    implementation = "models.regulariser_base:Regulariser"
    plain_kl = False
    min_batch = 1
    accumulates = True
    deterministic_ok = False  # usable by a deterministic autoencoder (loss.objective=ae): no KL, no posterior σ
    matches_prior = False     # pulls the codes' distribution to the prior, so that prior draws decode to images
    trains_prior = False      # its term draws from the prior with gradients, which train a learned prior without a KL
    layers_ok = False         # takes a ladder's KL summed over its stochastic layers (models/ladder.py)

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        """Refuse, in one line, ``loss`` keys that cannot take effect with this regulariser."""
        if loss.mmd_weight > 0:
            raise UserError(f"loss.mmd_weight={loss.mmd_weight:g} has no effect with loss.regulariser="
                            f"{loss.regulariser}: set loss.regulariser=mmd, or drop mmd_weight")

    @classmethod
    def complete_config(cls, loss: LossConfig, train_size: Callable[[], int]) -> None:
        """Fill keys left at 0 ('from the data') when the config is resolved, so that --dry-run shows them and
        config.yaml records them. ``train_size()`` counts the training set from its metadata: call it only when
        a key needs it (counting some sets opens their files)."""


class KLRules(RegulariserRules):
    implementation = "models.regularisers:KL"
    plain_kl = True
    layers_ok = True


class NoRegulariserRules(RegulariserRules):
    implementation = "models.regularisers:NoRegulariser"
    deterministic_ok = True


class MMDRules(RegulariserRules):
    implementation = "models.regularisers:MMD"
    deterministic_ok = True  # with loss.objective=ae: the Wasserstein autoencoder (Tolstikhin et al. 2018)
    matches_prior = True
    trains_prior = True      # the MMD's prior draws are reparameterised: a VampPrior's pseudo-inputs learn from it

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        if loss.mmd_weight == 0:
            raise UserError("loss.regulariser=mmd needs loss.mmd_weight > 0 (100 suits MNIST): set it, or use "
                            "loss.regulariser=kl")


class TCVAERules(RegulariserRules):
    implementation = "models.total_correlation:TCVAE"
    min_batch = 2

    @classmethod
    def complete_config(cls, loss: LossConfig, train_size: Callable[[], int]) -> None:
        if loss.tc_dataset_size == 0:
            loss.tc_dataset_size = train_size()  # evaluation and resume then use the same N


class CriticRules(RegulariserRules):
    """A regulariser with a network of its own, trained on each step's whole batch of codes."""

    implementation = "models.adversarial:CriticRegulariser"
    min_batch = 2
    accumulates = False


class FactorVAERules(CriticRules):
    implementation = "models.adversarial:FactorVAE"


class AdversarialRules(CriticRules):
    implementation = "models.adversarial:Adversarial"
    deterministic_ok = True
    matches_prior = True


class DIPRules(RegulariserRules):
    implementation = "models.regularisers:DIP"
    min_batch = 2


class DIPIIRules(DIPRules):
    implementation = "models.regularisers:DIPII"


REGULARISERS: dict[str, type[RegulariserRules]] = {
    "kl": KLRules,
    "none": NoRegulariserRules,
    "mmd": MMDRules,
    "tcvae": TCVAERules,
    "factorvae": FactorVAERules,
    "aae": AdversarialRules,
    "dip_i": DIPRules,
    "dip_ii": DIPIIRules,
}
