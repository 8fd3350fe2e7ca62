"""What each ex-post sampler states without torch: whether it is fitted, and the options its fit depends on
(each an ``Option``: name, default, help, type, check), and the registry of samplers, ``SAMPLERS``
(``sample.py --sampler``: name -> rules class). Each sampler's torch class (samplers.py, flows.py) subclasses
its rules class here, and ``load()`` returns it.

Why apart from the torch classes: ``sample.py`` and ``evaluate.py`` build their sampler flags from these
declarations and refuse a bad value (``--gmm_components 0``) before torch loads; ``SamplerOptions`` checks the
same declarations from Python. A new sampler is one rules class here (its options beside it), one torch class,
and one ``SAMPLERS`` entry; nothing else names it.
"""

from __future__ import annotations

from typing import Any

from utils.errors import UserError
from utils.fields import Option, PartRules

COVARIANCES = ("full", "tied", "diag", "spherical")  # scikit-learn's GaussianMixture covariance types

SEED = Option("seed", 0, "the fit's seed (a drawing's is --seed)", flag=False)  # shared: declared once


class SamplerRules(PartRules):
    """Codes z (n, d) for a model: from its prior, or from a density fitted to its training codes."""

    implementation = "models.samplers:Sampler"
    fitted = True  # fitted to codes (False: the model's prior, nothing to fit or keep)
    options: tuple[Option, ...] = ()  # what its fit depends on: a kept fit is reused only while they are the same
    draw_options: tuple[Option, ...] = ()  # how it draws from a fit: a kept fit is reused whatever they are

    @classmethod
    def every_option(cls) -> tuple[Option, ...]:
        return cls.options + cls.draw_options


class PriorSamplerRules(SamplerRules):
    implementation = "models.samplers:PriorSampler"
    fitted = False


class GaussianMixtureRules(SamplerRules):
    implementation = "models.samplers:GaussianMixtureSampler"
    options = (Option("gmm_components", 10, "gmm: mixture components (default 10)", min=1),
               Option("gmm_covariance", "full", "gmm: covariance type (default full)", type=str, choices=COVARIANCES),
               SEED)


class TwoStageRules(SamplerRules):
    implementation = "models.samplers:TwoStageSampler"
    options = (Option("two_stage_steps", 3000, "two_stage: training steps of the second VAE (default 3000)", min=1),
               Option("two_stage_hidden", [512, 512], "two_stage: the second VAE's hidden layer widths", type=list,
                      flag=False),
               SEED)


class FlowRules(SamplerRules):
    implementation = "models.flows:FlowSampler"
    options = (Option("flow_layers", 8, "flow: coupling layers (default 8)", min=1),
               Option("flow_hidden", 128, "flow: hidden width of each coupling's network (default 128)", min=1),
               Option("flow_steps", 2000, "flow: training steps (default 2000)", min=1),
               Option("flow_lr", 1e-3, "flow: Adam's learning rate (default 0.001)", type=float, min=0,
                      min_exclusive=True),
               SEED)


class FlowMatchingRules(SamplerRules):
    implementation = "models.flows:FlowMatchingSampler"
    options = (Option("flow_matching_hidden", 256, "flow_matching: hidden width of the velocity network (default "
                                                   "256)", min=1),
               Option("flow_matching_steps", 3000, "flow_matching: training steps (default 3000)", min=1),
               Option("flow_matching_lr", 1e-3, "flow_matching: Adam's learning rate (default 0.001)", type=float,
                      min=0, min_exclusive=True),
               SEED)
    draw_options = (Option("flow_matching_ode_steps", 32, "flow_matching: midpoint steps of the ODE solver (default "
                                                          "32)", min=1),)


SAMPLERS: dict[str, type[SamplerRules]] = {
    "prior": PriorSamplerRules,
    "gmm": GaussianMixtureRules,
    "two_stage": TwoStageRules,
    "flow": FlowRules,
    "flow_matching": FlowMatchingRules,
}


def declared_options() -> dict[str, Option]:
    """Every option the samplers declare, each once, in the registry's order."""
    return {o.name: o for rules in SAMPLERS.values() for o in rules.every_option()}


def fitted_names() -> list[str]:
    """The samplers fitted to codes (all but the prior), in the registry's order."""
    return [name for name, rules in SAMPLERS.items() if rules.fitted]


class SamplerOptions:
    """What the fits depend on: each option a sampler declares (``declared_options``), its default where not
    given. A fitted sampler is reused only while its own options (``of``) are the same. Checked when made, so
    that neither the command line nor the API can fit (and keep, over a good one) a sampler from bad options."""

    def __init__(self, **given: Any):
        declared = declared_options()
        for name in given:
            if name not in declared:
                raise UserError(f"unknown sampler option {name!r}: the samplers take {', '.join(declared)}")
        for name, o in declared.items():
            value = given.get(name, o.default)
            problem = o.problem(value)
            if problem:
                raise UserError(f"sampler option {name} {problem}")
            setattr(self, name, o.coerced(value))

    def of(self, name: str) -> dict[str, str]:
        """The options the sampler ``name``'s fit depends on, as the text kept in its file's metadata."""
        return {o.name: str(getattr(self, o.name)) for o in SAMPLERS[name].options}

    def __repr__(self) -> str:
        return f"SamplerOptions({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SamplerOptions) and vars(self) == vars(other)
