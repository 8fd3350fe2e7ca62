"""What each prior states for config validation, without torch, and the registry of priors, ``PRIORS``
(``model.prior``: name -> rules class). Each prior's torch class (priors.py) subclasses its rules class here,
and ``load()`` returns it."""

from __future__ import annotations

from utils.fields import PartRules


class PriorRules(PartRules):
    """p(z) over codes of size ``model.z_dim``."""

    implementation = "models.priors:Prior"
    conditional = True  # usable by a conditional VAE (whose prior stays p(z))
    learned = False     # has parameters, which only log p(z) in the KL, or draws from it with gradients, train


class StandardNormalRules(PriorRules):
    implementation = "models.priors:StandardNormal"


class VampPriorRules(PriorRules):
    implementation = "models.priors:VampPrior"
    conditional = False  # the pseudo-inputs have no class label
    learned = True       # the pseudo-inputs


PRIORS: dict[str, type[PriorRules]] = {
    "normal": StandardNormalRules,
    "vamp": VampPriorRules,
}
