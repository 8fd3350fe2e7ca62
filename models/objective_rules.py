"""What each objective states for config validation, without torch, and the registry of objectives,
``OBJECTIVES`` (``loss.objective``: name -> rules class). Each objective's torch class (objectives.py)
subclasses its rules class here, and ``load()`` returns it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.regulariser_rules import REGULARISERS
from utils.errors import UserError
from utils.fields import PartRules, Registry

if TYPE_CHECKING:
    from models.config import LossConfig


# the reconstruction terms that sharpen (models/perceptual.py), each weighted by ``loss.<name>``
PERCEPTUAL = Registry("models.perceptual", "TERMS")


def perceptual_on(loss: LossConfig) -> list[str]:
    """The sharpening terms a config switches on (weight > 0)."""
    return [name for name in PERCEPTUAL.names() if getattr(loss, name) > 0]


class ObjectiveRules(PartRules):
    """``deterministic``: no posterior sampling and no KL (an autoencoder), so no bound on log p(x) either;
    ``layers_ok``: it draws through every stochastic layer of a ladder (models/ladder.py); ``check``: the
    ``loss`` keys it cannot honour."""

    implementation = "models.objectives:Objective"
    deterministic = False
    layers_ok = True

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        """Refuse, in one line, ``loss`` keys this objective cannot honour (called when a config is validated)."""
        if loss.k > 1:
            raise UserError(f"loss.k={loss.k} is used only by loss.objective=iwae: set loss.objective=iwae, or drop k")
        if loss.lpips > 0 and not loss.lpips_weights:
            raise UserError(f"loss.lpips={loss.lpips:g} needs the backbone's weights, which are never downloaded: "
                            f"pass loss.lpips_weights=PATH (torchvision's file for loss.lpips_net={loss.lpips_net})")


class ELBORules(ObjectiveRules):
    implementation = "models.objectives:ELBO"


def _no_kl_aids(loss: LossConfig) -> None:
    """free bits and KL balancing reshape the ELBO's KL term, which the other objectives do not have."""
    if loss.free_bits > 0 or loss.kl_balance:
        raise UserError(f"loss.free_bits and loss.kl_balance reshape the ELBO's KL term, which loss.objective="
                        f"{loss.objective} does not have: use loss.objective=elbo, or drop them")


class IWAERules(ObjectiveRules):
    implementation = "models.objectives:IWAE"

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        _no_kl_aids(loss)
        if perceptual_on(loss):
            raise UserError(f"loss.objective=iwae weights samples by p(x|z)p(z)/q(z|x), which has no place for "
                            f"loss.{perceptual_on(loss)[0]}: set it to 0, or use loss.objective=elbo")
        if not REGULARISERS[loss.regulariser].plain_kl:
            raise UserError(f"loss.objective=iwae weights samples by p(x|z)p(z)/q(z|x) and has no place for "
                            f"loss.regulariser={loss.regulariser}: use loss.regulariser=kl or loss.objective=elbo")
        if loss.disc_weight > 0:
            raise UserError(f"loss.objective=iwae trains a bound on log p(x), which has no place for an adversarial "
                            f"term (loss.disc_weight={loss.disc_weight:g}): use loss.objective=elbo, or drop "
                            f"disc_weight")


class AERules(ObjectiveRules):
    implementation = "models.objectives:AE"
    deterministic = True
    layers_ok = False

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        super().check(loss)
        _no_kl_aids(loss)
        if not REGULARISERS[loss.regulariser].deterministic_ok:
            ok = ", ".join(k for k, r in REGULARISERS.items() if r.deterministic_ok)
            raise UserError(f"loss.objective=ae has no posterior variance and no KL, which loss.regulariser="
                            f"{loss.regulariser} needs: use one of {ok}, or loss.objective=elbo")
        if loss.beta != 1.0 or loss.kl_warmup_steps:
            raise UserError("loss.beta and loss.kl_warmup_steps weigh the KL, which loss.objective=ae does not have: "
                            "drop them")


OBJECTIVES: dict[str, type[ObjectiveRules]] = {
    "elbo": ELBORules,
    "iwae": IWAERules,
    "ae": AERules,
}
