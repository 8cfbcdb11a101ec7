"""A run's experiment, resolved once before anything runs: the parsed config (``config.py``) with
its models resolved to local paths and checked to be fine-tunes of one base, its merge section or
genome checked to make valid recipes, the genome built over the resolved models and the CMA-ES
budget laid out. The driver, the executors and the strategies read this object and never the raw
config mapping again; it is immutable."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._core import open_model
from ..io.resolve import resolve
from ..merge.parameters import layer_of
from ..merge.recipe import RecipeError, load_config
from .config import EvolveConfig
from .errors import RunError
from .genome import Genome, GenomeSpec
from .recipes import pair_recipe, soup_recipe


@dataclass(frozen=True)
class SearchPlan:
    """A CMA-ES search's shape: whole generations of ``popsize`` within ``cmaes.max_evals``."""

    popsize: int
    generations: int


@dataclass(frozen=True)
class Experiment:
    """A validated config over resolved models. ``base`` is None only for a genome without one."""

    config: EvolveConfig
    base: str | None
    pool: tuple[str, ...]
    genome: Genome | None = None
    search: SearchPlan | None = None

    @property
    def base_required(self) -> str:
        """The base's path, for strategies that always have one (topk, greedy_soup)."""
        assert self.base is not None, "topk and greedy_soup always have a base"
        return self.base


def default_popsize(n: int) -> int:
    """CMA-ES's default population for n genes: 4 + floor(3 ln n)."""
    return 4 + int(3 * math.log(n))


def prepare_experiment(config: EvolveConfig, offline: bool = False) -> Experiment:
    """Resolves the base and the pool and refuses, before anything runs, a pool model that is not a
    fine-tune of the base (another tensor set or shape), a merge section that makes no valid recipe,
    or a genome that does not fit the models."""
    base = None if config.base_model is None else str(resolve(config.model_path(config.base_model), offline=offline))
    pool = [str(resolve(config.model_path(ref), offline=offline)) for ref in config.pool]
    reference, reference_name = (base, config.base_model) if base is not None else (pool[0], config.pool[0])
    assert reference is not None and reference_name is not None
    expected = {name: shape for name, shape, _ in open_model(reference).tensors()}
    for ref, path in zip(config.pool, pool, strict=True):
        found = {name: shape for name, shape, _ in open_model(path).tensors()}
        _check_fine_tune(ref, found, expected, reference_name)
    if config.genome is not None:
        genome = build_genome(config, config.genome, base, pool, list(expected))
        try:
            load_config(genome.recipe(genome.initial()))
        except RecipeError as error:
            raise RecipeError(f"{config.source}: genome: {str(error).split(': ', 1)[-1]}") from error
        return Experiment(config, base, tuple(pool), genome, search_plan(config, genome))
    assert base is not None
    try:
        if config.strategy == "topk":
            load_config(pair_recipe(config.merge, pool[0], pool[1], base))
        else:
            load_config(soup_recipe(config.merge, pool))
    except RecipeError as error:
        raise RecipeError(f"{config.source}: merge: {str(error).split(': ', 1)[-1]}") from error
    return Experiment(config, base, tuple(pool))


def search_plan(config: EvolveConfig, genome: Genome) -> SearchPlan:
    """(population size, generations) of a search: whole generations within ``max_evals``."""
    settings = config.cmaes
    popsize = settings.popsize or default_popsize(genome.size)
    generations = settings.max_evals // popsize
    if generations < 1:
        raise RecipeError(
            f"{config.source}: cmaes.max_evals: {settings.max_evals} is less than one population of {popsize}"
        )
    return SearchPlan(popsize, generations)


def build_genome(
    config: EvolveConfig, spec: GenomeSpec, base: str | None, pool: Sequence[str], tensors: Sequence[str]
) -> Genome:
    """The genome over resolved models, its layer count read as mergekit-evolve reads it (the first
    model's config.json ``num_hidden_layers``, else the layer numbers in the tensor names)."""
    first = Path(pool[0])
    layers = 0
    with contextlib.suppress(OSError, ValueError):
        layers = int(
            json.loads(((first if first.is_dir() else first.parent) / "config.json").read_text()).get(
                "num_hidden_layers"
            )
            or 0
        )
    if not layers:
        found = [layer_of(n) for n in tensors]
        layers = max((x for x in found if x is not None), default=-1) + 1
    where = f"{config.source}: genome"
    if layers < 1:
        raise RecipeError(f"{where}: cannot tell the layer count of {config.pool[0]} (no num_hidden_layers)")
    if spec.layer_granularity > 0 and layers % spec.layer_granularity:
        raise RecipeError(f"{where}.layer_granularity: {layers} layers are not divisible by {spec.layer_granularity}")
    for pattern in spec.filters:
        if not any(pattern in name for name in tensors):
            raise RecipeError(f"{where}.filters: {pattern!r} matches no tensor of {config.pool[0]}")
    genome = Genome(spec, layers, pool, base)
    if spec.merge_method == "slerp" and genome.groups > 1:
        raise RecipeError(
            f"{where}.layer_granularity: a slerp genome with {genome.groups} layer groups needs a base model per"
            " slice, which modelkin's slices do not support yet (use layer_granularity: 0)"
        )
    return genome


def _check_fine_tune(ref: str, found: dict[str, list[int]], expected: dict[str, list[int]], base: str) -> None:
    missing = [n for n in expected if n not in found]
    if missing:
        raise RunError(f"pool model {ref} is not a fine-tune of {base}: it lacks tensor {missing[0]}")
    extra = [n for n in found if n not in expected]
    if extra:
        raise RunError(f"pool model {ref} is not a fine-tune of {base}: it has tensor {extra[0]}, the base does not")
    for name, shape in expected.items():
        if found[name] != shape:
            raise RunError(
                f"pool model {ref} is not a fine-tune of {base}: tensor {name} has shape {found[name]},"
                f" the base {shape}"
            )
