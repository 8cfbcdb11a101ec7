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
from typing import Any

from .._core import open_model
from ..io.adapter import check_fits, is_adapter, resolve_adapted
from ..io.resolve import resolve
from ..io.towers import read_vlm
from ..merge.parameters import layer_of
from ..merge.recipe import RecipeError, load_config
from .config import EvolveConfig
from .dfs_genome import OUTPUT_PROJECTIONS, PS_MODEL, DfsGenome, DfsSpec
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
    # strategy dfs and ps+dfs: the layer-path genome (for ps+dfs its first model is the PS phase's
    # best, bound when that phase ends: see DfsGenome.with_first) and its search's shape.
    dfs: DfsGenome | None = None
    dfs_search: SearchPlan | None = None

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
    adapters = [ref for ref, path in zip(config.pool, pool, strict=True) if is_adapter(path)]
    if adapters and config.dfs is not None:
        raise RunError(f"pool model {adapters[0]} is a LoRA adapter: strategy {config.strategy} takes full models")
    if config.strategy == "dfs":
        assert config.dfs is not None
        dfs = build_dfs(config, config.dfs, dict(zip(config.pool, pool, strict=True)), None)
        return Experiment(config, base, tuple(pool), dfs=dfs, dfs_search=search_plan(config, dfs.size))
    reference, reference_name = (base, config.base_model) if base is not None else (pool[0], config.pool[0])
    assert reference is not None and reference_name is not None
    expected = {name: shape for name, shape, _ in open_model(reference).tensors()}
    for ref, path in zip(config.pool, pool, strict=True):
        if is_adapter(path):
            # An adapter is its base with a low-rank delta: it fits when its targets do.
            if base is None:
                raise RunError(f"pool model {ref} is a LoRA adapter: the run needs its base_model")
            found_base = resolve_adapted(path, offline=offline)
            assert found_base is not None
            if found_base[0].resolve() != Path(base).resolve():
                raise RunError(f"pool model {ref} is a LoRA adapter of {found_base[0]}, not of the base {base}")
            check_fits(found_base[1], expected, reference_name)
            continue
        vlm = read_vlm(path)
        # A VLM takes part through its language model, which must fit the (text) base.
        handle = vlm.language_model() if vlm is not None else open_model(path)
        found = {name: shape for name, shape, _ in handle.tensors()}
        _check_fine_tune(ref, found, expected, reference_name)
    if config.genome is not None:
        genome = build_genome(config, config.genome, base, pool, list(expected))
        try:
            load_config(genome.recipe(genome.initial()))
        except RecipeError as error:
            raise RecipeError(f"{config.source}: genome: {str(error).split(': ', 1)[-1]}") from error
        plan = search_plan(config, genome.size)
        if config.dfs is None:
            return Experiment(config, base, tuple(pool), genome, plan)
        # ps+dfs: the PS phase's best has the PS models' architecture (its stand-in: the first).
        dfs = build_dfs(config, config.dfs, dict(zip(config.pool, pool, strict=True)), pool[0])
        budget = config.cmaes.dfs_max_evals or config.cmaes.max_evals
        return Experiment(config, base, tuple(pool), genome, plan, dfs, search_plan(config, dfs.size, budget))
    assert base is not None
    try:
        if config.strategy == "topk":
            load_config(pair_recipe(config.merge, pool[0], pool[1], base))
        else:
            load_config(soup_recipe(config.merge, pool))
    except RecipeError as error:
        raise RecipeError(f"{config.source}: merge: {str(error).split(': ', 1)[-1]}") from error
    return Experiment(config, base, tuple(pool))


def search_plan(config: EvolveConfig, size: int, budget: int | None = None) -> SearchPlan:
    """(population size, generations) of a search of ``size`` genes: whole generations within
    ``budget`` (``cmaes.max_evals`` unless given)."""
    settings = config.cmaes
    popsize = settings.popsize or default_popsize(size)
    evals = settings.max_evals if budget is None else budget
    generations = evals // popsize
    if generations < 1:
        key = "max_evals" if budget is None else "dfs_max_evals"
        raise RecipeError(f"{config.source}: cmaes.{key}: {evals} is less than one population of {popsize}")
    return SearchPlan(popsize, generations)


def build_dfs(config: EvolveConfig, spec: DfsSpec, paths: dict[str, str], ps_stand_in: str | None) -> DfsGenome:
    """The layer-path genome over the resolved DFS models, refusing models of another architecture
    or hidden size than A's, and architectures where scales cannot be folded into the weights."""
    where = f"{config.source}: dfs.models"
    models = [ps_stand_in if ref == PS_MODEL and ps_stand_in is not None else paths[ref] for ref in spec.models]
    configs = [_config(path) for path in models]
    first_type = configs[0].get("model_type")
    if first_type not in OUTPUT_PROJECTIONS:
        raise RecipeError(
            f"{where}: {spec.models[0]} is a {first_type or 'model without a model_type'}: DFS folds its scales into"
            f" pre-norm layers of {', '.join(OUTPUT_PROJECTIONS)} (post-norm and extra sublayer norms, as Gemma-2/3's,"
            " do not fold)"
        )
    layouts = [_layer_layout(path) for path in models]
    layers = []
    for ref, cfg, (count, layout) in zip(spec.models, configs, layouts, strict=True):
        if cfg.get("model_type") != first_type:
            raise RecipeError(f"{where}: {ref} is a {cfg.get('model_type')}, {spec.models[0]} a {first_type}")
        if layout != layouts[0][1]:
            differs = sorted(set(layout.items()) ^ set(layouts[0][1].items()))[0][0]
            raise RecipeError(f"{where}: {ref} and {spec.models[0]} differ in tensor {differs} (shape or presence)")
        layers.append(count)
    return DfsGenome(spec, models, layers, str(first_type))


def _config(path: str) -> dict[str, Any]:
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        loaded: dict[str, Any] = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded


def _layer_layout(path: str) -> tuple[int, dict[str, tuple[tuple[int, ...], ...]]]:
    """(layer count, the shapes of every tensor name with its layer number replaced by N)."""
    shapes: dict[str, set[tuple[int, ...]]] = {}
    numbers = set()
    for name, shape, _ in open_model(path).tensors():
        layer = layer_of(name)
        if layer is not None:
            numbers.add(layer)
            name = name.replace(f".{layer}.", ".N.", 1)
        shapes.setdefault(name, set()).add(tuple(shape))
    return len(numbers), {name: tuple(sorted(found)) for name, found in shapes.items()}


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
