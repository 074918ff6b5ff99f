"""Ray Tune's side of a search space: the conditional domain that gives a method's (or
sampler's) hyperparameter a value only in trials of that method. Kept apart from
:mod:`kdtune.search.space` because subclassing Tune's classes imports Ray."""
from __future__ import annotations

from typing import Any

from ray.tune.search.sample import Domain, Sampler
from ray.tune.search.variant_generator import RecursiveDependencyError


def _trial_choice(config: Any, key: str = "method") -> Any:
    # Tune's BasicVariantGenerator hands over the whole experiment spec ({"config": ...,
    # "run": ...}); generate_variants(param_space) the config itself.
    if key not in config and isinstance(config.get("config"), dict):
        config = config["config"]
    choice = config[key]
    if isinstance(choice, Domain):  # not drawn yet: Tune retries after the other variables
        raise RecursiveDependencyError(f"{key} is not resolved yet")
    return choice


class _ConditionalSampler(Sampler):
    def sample(self, domain: Conditional, config: Any = None, size: int = 1, random_state: Any = None) -> Any:
        configs = config if isinstance(config, list) else [config] * size
        values = [domain.draw(c, random_state) for c in configs]
        return values if size > 1 else values[0]


class Conditional(Domain):
    """A method's (or sampler's) hyperparameter in a Tune config: drawn from that method's domain
    in trials of a method that has it, None in the others. ``parent`` is the key whose drawn
    choice decides ("method" or "sampler").

    A Domain rather than ``tune.sample_from``: Tune calls sample_from functions without its
    random state (so a seeded random search would not be reproducible), while a Domain is
    drawn by the variant generator with the searcher's seeded generator.
    """

    default_sampler_cls = _ConditionalSampler

    def __init__(self, name: str, domains: dict[str, Domain], parent: str = "method") -> None:
        self.name = name
        self.domains = domains
        self.parent = parent

    def draw(self, config: Any, random_state: Any = None) -> Any:
        domain = self.domains.get(_trial_choice(config, self.parent))
        return None if domain is None else domain.sample(random_state=random_state)

    def is_valid(self, value: Any) -> bool:
        return value is None or any(d.is_valid(value) for d in self.domains.values())

    @property
    def domain_str(self) -> str:
        parts = [f"{m}: {type(d).__name__}{d.domain_str} {type(d.get_sampler()).__name__.lstrip('_')}"
                 for m, d in self.domains.items()]
        return f"{self.parent} " + "{" + ", ".join(parts) + ", else None}"

    def __repr__(self) -> str:
        return f"Conditional({self.name}: {self.domain_str})"


