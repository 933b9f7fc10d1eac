"""A checked sweep's space as Ray Tune's search space and search algorithm.

Tune's ``randint`` excludes its upper bound; a sweep file's includes it (``{randint: [1, 4]}`` draws 1 to
4), so the bound moves by one here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from vgmedgen.platform.tuning.config import Distribution, Sweep

__all__ = ["search_algorithm", "tune_space"]


def _tune(dist: Distribution) -> Any:
    from ray import tune

    kind = dist.kind
    if kind == "choice":
        return tune.choice(list(dist.choice or []))
    if kind == "grid":
        return tune.grid_search(list(dist.grid or []))
    if kind == "uniform":
        return tune.uniform(*dist.uniform)  # type: ignore[misc]
    if kind == "loguniform":
        return tune.loguniform(*dist.loguniform)  # type: ignore[misc]
    low, high = dist.randint  # type: ignore[misc]
    return tune.randint(low, high + 1)


def tune_space(sweep: Sweep) -> dict[str, Any]:
    """``{dotted path: Tune distribution}`` for the Tuner's ``param_space``."""
    return {path: _tune(dist) for path, dist in sweep.config.space.items()}


def search_algorithm(sweep: Sweep) -> Any:
    """The seeded search algorithm of the sweep (None for grid search: Tune's own variant generator)."""
    cfg = sweep.config
    if cfg.search.algorithm == "grid":
        return None
    if cfg.search.algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=cfg.search.seed)
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=TPESampler(seed=cfg.search.seed))
