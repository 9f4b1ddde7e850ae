"""The pipeline sections pydantic sees only as dicts or names (model configs, loss weights, priors specs, perceiver
configs, recipes, further cross-validation restorers), checked against their real schemas before any stage runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clearair.losses import loss_weights
from clearair.models.factory import model_config, plain_architectures, required_priors
from clearair.priors import check_priors, perceiver_config
from synth.recipes import RecipeError, load_recipe

if TYPE_CHECKING:
    from workflows.config import ModelSpec, PipelineConfig


def problems(cfg: PipelineConfig) -> list[str]:
    """Every problem of ``cfg``'s free-form sections, each naming its key; empty when there is none."""
    found: list[str] = []
    for name, section in (("crossval", cfg.crossval), ("train", cfg.train)):
        try:
            model_config(section.model.arch, dict(section.model.config), section.model.preset)
        except (ValueError, TypeError, KeyError) as err:
            found.append(f"{name}.model: {err}")
        try:
            loss_weights(section.loss, dict(section.loss_weights))
        except ValueError as err:
            found.append(f"{name}.loss_weights: {err}")
        try:
            check_priors(dict(section.priors), f"{name}.priors", learned_perceiver=True)
        except ValueError as err:
            found.append(str(err))
    for i, spec in enumerate(cfg.crossval.models):
        found += _plain_restorer_problems(spec, f"crossval.models[{i}]")
    try:
        perceiver_config(dict(cfg.perceiver.perceiver))
    except ValueError as err:
        found.append(f"perceiver.perceiver: {err}")
    try:
        load_recipe(cfg.synth.recipe)
    except RecipeError as err:
        found.append(f"synth.recipe: {err}")
    return found


def _plain_restorer_problems(spec: ModelSpec, where: str) -> list[str]:
    """What stops ``spec`` from being built and trained without priors (a further cross-validation restorer)."""
    try:
        model_config(spec.arch, dict(spec.config), spec.preset)
    except (ValueError, TypeError, KeyError) as err:
        return [f"{where}: {err}"]
    needs = list(required_priors(spec.arch))
    if not needs:
        return []
    valid = ", ".join(plain_architectures())
    return [f"{where}: {spec.arch!r} needs priors {needs}; further fold restorers are trained without priors: {valid}"]
