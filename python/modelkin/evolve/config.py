"""The evolution config (``evolve.yml``): parsed with PyYAML and validated into typed objects.

Every key is either used or refused with a one-line error naming it and its line: a run that
silently ignores part of its config would report results of an experiment nobody asked for."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from ..merge.recipe import METHODS, RecipeError
from .checker import Checker
from .dfs_genome import PS_MODEL, SCALE_MEANINGS, SCALINGS, DfsSpec
from .evaluator_config import (
    LM_EVAL_TOP_KEYS,
    MERGEKIT_EVOLVE_KEYS,
    EvaluatorSpec,
    include_paths,
    lm_eval_test_weights,
    lm_eval_weights,
    parse_evaluator,
)
from .genome import METHOD_PARAMS, NEEDS_BASE, GenomeSpec

Strategy = Literal["topk", "greedy_soup", "cmaes", "dfs", "ps+dfs"]
STRATEGIES: tuple[str, ...] = ("topk", "greedy_soup", "cmaes", "dfs", "ps+dfs")
# Strategies that run CMA-ES (and read the cmaes: section).
SEARCHES: tuple[str, ...] = ("cmaes", "dfs", "ps+dfs")
# Strategies that this version refuses by name rather than ignoring.
PLANNED_STRATEGIES: tuple[str, ...] = ()
# The splits an evaluator is asked for: search drives selection, test is held out and only reported.
SPLITS = ("search", "test")
KINSHIP_METRICS = ("pcc", "cs", "ed")
# Keys of the `merge:` section: a mergekit recipe without its models (the strategy picks those).
MERGE_KEYS = ("merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source")


@dataclass(frozen=True)
class TopK:
    """Hu et al.'s Top-k greedy merging, optionally with the kinship-guided exploration merge."""

    k: int = 3
    generations: int = 5
    explore: Literal["kinship", "none"] = "kinship"
    metric: Literal["pcc", "cs", "ed"] = "pcc"
    stop_kinship: float | None = 0.9
    patience: int = 1


@dataclass(frozen=True)
class GreedySoup:
    """Wortsman et al.'s greedy soup: keep an ingredient when the soup's score does not drop."""

    compare: Literal[">=", ">"] = ">="


@dataclass(frozen=True)
class Cmaes:
    """CMA-ES settings (the ``cmaes`` package): popsize None is its default 4 + floor(3 ln n);
    ``penalty`` None scores a failed candidate as the worst seen so far."""

    sigma0: float = 1 / 6
    popsize: int | None = None
    max_evals: int = 100
    seed: int | None = None
    penalty: float | None = None
    random_init: bool = False
    # ps+dfs: the DFS phase's budget (max_evals is the PS phase's); None: the same as max_evals.
    dfs_max_evals: int | None = None


@dataclass(frozen=True)
class EvolveConfig:
    """A validated evolution config; ``text`` is what was read (stored with the run)."""

    pool: tuple[str, ...]
    base_model: str | None
    strategy: Strategy
    topk: TopK
    greedy_soup: GreedySoup
    merge: Mapping[str, Any]
    evaluator: EvaluatorSpec
    weights: Mapping[str, float] | None
    seed: int
    keep: Literal["all", "top"]
    max_failures: int
    source: str
    text: str
    # Where relative model paths are resolved from: the config file's directory.
    root: Path
    genome: GenomeSpec | None = None
    cmaes: Cmaes = field(default_factory=Cmaes)
    dfs: DfsSpec | None = None
    # Resources, not part of the experiment (they change no decision): not in the fingerprint.
    workers: int = 1
    ray: str | None = None
    # The test split's objective weights when they differ from the search split's (lm-eval's
    # test_tasks name other tasks than tasks:); derived from the evaluator, so not fingerprinted.
    test_weights: Mapping[str, float] | None = None
    separate_test_weights: bool = False

    @property
    def fingerprint(self) -> str:
        """Identity of the experiment: a run directory holds results of exactly one config."""
        data = {
            "pool": [self.model_path(p) for p in self.pool],
            "base_model": None if self.base_model is None else self.model_path(self.base_model),
            "strategy": self.strategy,
            "topk": self.topk.__dict__,
            "greedy_soup": self.greedy_soup.__dict__,
            "merge": dict(self.merge),
            "evaluator": {
                **{k: v for k, v in self.evaluator.__dict__.items() if k != "resident"},
                "lm_eval": dict(self.evaluator.lm_eval),
            },
            "weights": dict(self.weights) if self.weights is not None else None,
            "seed": self.seed,
            "keep": self.keep,
            "genome": None if self.genome is None else self.genome.__dict__,
            # dfs_max_evals only where set: a run made before it existed keeps its identity.
            "cmaes": {k: v for k, v in self.cmaes.__dict__.items() if k != "dfs_max_evals" or v is not None},
            **({"dfs": self.dfs.__dict__} if self.dfs is not None else {}),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def split_weights(self, split: str) -> Mapping[str, float] | None:
        """The objective weights of one split's scores (None: the plain mean)."""
        return self.test_weights if split == "test" and self.separate_test_weights else self.weights

    def model_path(self, reference: str) -> str:
        """A model reference with relative local paths made absolute (from the config's directory)."""
        candidate = self.root / reference
        if not Path(reference).is_absolute() and (reference.startswith(".") or candidate.exists()):
            return str(candidate.resolve())
        return reference


TOP_KEYS = (
    "pool",
    "base_model",
    "strategy",
    "topk",
    "greedy_soup",
    "merge",
    "evaluator",
    "objective",
    "seed",
    "keep",
    "max_failures",
    "workers",
    "ray",
    "name",
    "genome",
    "cmaes",
    "dfs",
    *MERGEKIT_EVOLVE_KEYS,
    *LM_EVAL_TOP_KEYS,
)


def load_evolve_config(config: str | Path | Mapping[str, Any]) -> EvolveConfig:
    """Reads ``evolve.yml`` (or a dict with its keys) and validates every key."""
    if isinstance(config, Mapping):
        raw: Any = dict(config)
        text = yaml.safe_dump(raw, sort_keys=False)
        check = Checker("config", None)
        root = Path.cwd()
    else:
        path = Path(config)
        try:
            text = path.read_text()
        except OSError as error:
            raise RecipeError(f"{path}: cannot read the config: {error.strerror or error}") from error
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"{path}:{where} invalid YAML: {getattr(error, 'problem', None) or error}") from error
        check = Checker(str(path), text)
        root = path.resolve().parent
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{check.source}: an evolution config is a mapping (pool, base_model, strategy, ...)")
    check.keys([], raw, TOP_KEYS)
    # A mergekit-evolve config (genome + tasks, no strategy) runs as the CMA-ES search it describes.
    strategy = raw.get("strategy", "cmaes" if "genome" in raw else "topk")
    if strategy in PLANNED_STRATEGIES:
        raise check.fail(["strategy"], f"strategy {strategy!r} is not supported yet")
    check.choice(["strategy"], strategy, STRATEGIES)
    genome = None
    dfs = None
    if strategy in ("cmaes", "ps+dfs"):
        for key in ("pool", "base_model", "merge"):
            if key in raw:
                raise check.fail([key], f"strategy {strategy} takes its models and method from genome:, not {key}:")
        genome = _genome(check, raw.get("genome"))
        pool: Any = list(genome.models)
        base = genome.base_model
    elif strategy == "dfs":
        for key in ("pool", "merge", "genome"):
            if key in raw:
                raise check.fail([key], f"strategy dfs takes its models from dfs:, not {key}:")
        base = raw.get("base_model")
        if base is not None and not isinstance(base, str):
            raise check.fail(["base_model"], "must be a model reference (scored beside the search, not merged)")
    else:
        for key in ("genome", "cmaes"):
            if key in raw:
                raise check.fail([key], f"{key}: is for strategy cmaes (this config's strategy is {strategy})")
        pool = raw.get("pool")
        base = raw.get("base_model")
        if not isinstance(base, str):
            raise check.fail(["base_model"], "a base_model reference is required (the pool's common base)")
    if strategy in ("dfs", "ps+dfs"):
        dfs = parse_dfs(check, raw.get("dfs"), strategy)
        sources = [m for m in dfs.models if m != PS_MODEL]
        pool = sources if strategy == "dfs" else [*pool, *(m for m in sources if m not in pool)]
    elif "dfs" in raw:
        raise check.fail(["dfs"], f"dfs: is for strategies dfs and ps+dfs (this config's strategy is {strategy})")
    minimum = 1 if strategy == "dfs" else 2
    if not isinstance(pool, list) or len(pool) < minimum or not all(isinstance(p, str) for p in pool):
        raise check.fail(["pool"], "a list of at least two model references is required")
    if len(set(pool)) != len(pool):
        raise check.fail(["pool"], "a model appears twice in the pool")
    topk = _topk(check, raw.get("topk"), strategy)
    soup = _soup(check, raw.get("greedy_soup"), strategy)
    merge = _merge(check, raw.get("merge"), strategy) if strategy != "cmaes" else {}
    evaluator = parse_evaluator(check, raw.get("evaluator"), raw, root)
    cmaes = _cmaes(check, raw.get("cmaes"), raw.get("random_init", False), strategy)
    weights = _objective(check, raw.get("objective"))
    seed = check.integer(["seed"], raw.get("seed", 0), 0)
    keep = check.choice(["keep"], raw.get("keep", "all"), ("all", "top"))
    max_failures = check.integer(["max_failures"], raw.get("max_failures", 5), 1)
    workers = check.integer(["workers"], raw.get("workers", 1), 1)
    ray_section = check.keys(["ray"], raw.get("ray"), ("address",))
    ray = ray_section.get("address") if "ray" in raw else None
    if "ray" in raw and not isinstance(ray, str):
        raise check.fail(["ray", "address"], "an address is required (host:port, auto, or local)")
    if "name" in raw and not isinstance(raw["name"], str):
        raise check.fail(["name"], "must be a string")
    test_weights, separate = weights, False
    if evaluator.kind == "lm_eval":
        test_weights, separate = lm_eval_test_weights(check, evaluator, weights)
        if weights is None:
            # mergekit-evolve's task entries carry their objective weights: resolved here, once.
            weights = lm_eval_weights(evaluator.lm_eval)
    return EvolveConfig(
        pool=tuple(pool),
        base_model=base,
        strategy=strategy,
        topk=topk,
        greedy_soup=soup,
        merge=merge,
        evaluator=evaluator,
        weights=weights,
        seed=seed,
        keep=keep,
        max_failures=max_failures,
        source=check.source,
        text=text,
        root=root,
        workers=workers,
        ray=ray,
        genome=genome,
        cmaes=cmaes,
        dfs=dfs,
        test_weights=test_weights,
        separate_test_weights=separate,
    )


def with_task_search_path(config: EvolveConfig, paths: Sequence[str | Path]) -> EvolveConfig:
    """mergekit-evolve's ``--task-search-path DIR`` (repeatable): directories of lm-eval task YAMLs
    added to the lm_eval evaluator's ``include_path`` (relative ones from the working directory, as
    a command-line path reads). Refused for any other evaluator, which would silently ignore them."""
    if not paths:
        return config
    if config.evaluator.kind != "lm_eval":
        raise RecipeError(
            f"--task-search-path: lm-eval task directories are for the lm_eval evaluator; {config.source}"
            f" configures a {config.evaluator.kind} evaluator"
        )
    added = []
    for path in paths:
        found = Path(path).expanduser().resolve()
        if not found.is_dir():
            raise RecipeError(f"--task-search-path: {path} is not a directory")
        added.append(str(found))
    settings = dict(config.evaluator.lm_eval)
    settings["include_path"] = [*include_paths(settings), *(p for p in added if p not in include_paths(settings))]
    evaluator = replace(config.evaluator, lm_eval=settings)
    return replace(config, evaluator=evaluator)


def _topk(check: Checker, value: Any, strategy: str) -> TopK:
    if value is not None and strategy != "topk":
        raise check.fail(["topk"], f"topk: settings given but the strategy is {strategy}")
    section = check.keys(["topk"], value, ("k", "generations", "explore", "metric", "stop_kinship", "patience"))
    at: list[str | int] = ["topk"]
    stop = section.get("stop_kinship", 0.9)
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, (int, float))):
        raise check.fail([*at, "stop_kinship"], "must be a number or null (never stop on kinship)")
    return TopK(
        k=check.integer([*at, "k"], section.get("k", 3), 2),
        generations=check.integer([*at, "generations"], section.get("generations", 5), 1),
        explore=check.choice([*at, "explore"], section.get("explore", "kinship"), ("kinship", "none")),
        metric=check.choice([*at, "metric"], section.get("metric", "pcc"), KINSHIP_METRICS),
        stop_kinship=None if stop is None else float(stop),
        patience=check.integer([*at, "patience"], section.get("patience", 1), 1),
    )


def _soup(check: Checker, value: Any, strategy: str) -> GreedySoup:
    if value is not None and strategy != "greedy_soup":
        raise check.fail(["greedy_soup"], f"greedy_soup: settings given but the strategy is {strategy}")
    section = check.keys(["greedy_soup"], value, ("compare",))
    return GreedySoup(compare=check.choice(["greedy_soup", "compare"], section.get("compare", ">="), (">=", ">")))


def _merge(check: Checker, value: Any, strategy: str) -> Mapping[str, Any]:
    section = dict(check.keys(["merge"], value, MERGE_KEYS))
    default = "linear" if strategy == "greedy_soup" else "slerp"
    method = section.setdefault("merge_method", default)
    if method not in METHODS:
        raise check.fail(["merge", "merge_method"], f"unknown merge_method {method!r}; supported: {', '.join(METHODS)}")
    if strategy == "greedy_soup" and method != "linear":
        raise check.fail(["merge", "merge_method"], "greedy_soup averages its ingredients: merge_method must be linear")
    if strategy == "greedy_soup" and "weight" in (section.get("parameters") or {}):
        raise check.fail(["merge", "parameters", "weight"], "a soup weighs its ingredients equally; remove weight")
    if method in ("passthrough", "model_stock", "karcher", "multislerp") and strategy == "topk":
        raise check.fail(["merge", "merge_method"], f"{method} is not a two-parent merge; topk merges pairs")
    if method == "slerp":
        section.setdefault("parameters", {"t": 0.5})
    if "parameters" in section and not isinstance(section["parameters"], Mapping):
        raise check.fail(["merge", "parameters"], "must be a mapping")
    return section


GENOME_KEYS = (
    "models",
    "merge_method",
    "base_model",
    "tokenizer_source",
    "layer_granularity",
    "normalize",
    "allow_negative_weights",
    "filters",
    "smooth",
    "dtype",
    "out_format",
)


def _genome(check: Checker, value: Any) -> GenomeSpec:
    if value is None:
        raise check.fail(["genome"], "strategy cmaes needs a genome: section (mergekit-evolve's keys)")
    section = check.keys(["genome"], value, GENOME_KEYS)
    at: list[str | int] = ["genome"]
    models = section.get("models")
    if not isinstance(models, list) or len(models) < 2:
        raise check.fail([*at, "models"], "a list of at least two model references is required")
    refs = [m if isinstance(m, str) else m.get("model") if isinstance(m, Mapping) else None for m in models]
    if not all(isinstance(r, str) for r in refs):
        raise check.fail([*at, "models"], "each model is a reference (or a mapping with model:)")
    method = section.get("merge_method")
    if method not in METHOD_PARAMS:
        raise check.fail([*at, "merge_method"], f"{method!r} is not a genome method ({', '.join(METHOD_PARAMS)})")
    base = section.get("base_model")
    if base is not None and not isinstance(base, str):
        raise check.fail([*at, "base_model"], "must be a model reference")
    if method in NEEDS_BASE and base is None:
        raise check.fail([*at, "base_model"], f"{method} needs a base_model")
    granularity = check.integer([*at, "layer_granularity"], section.get("layer_granularity", 0) or 0, 0)
    filters = section.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
        raise check.fail([*at, "filters"], "must be a list of tensor-name substrings")
    for key in ("allow_negative_weights", "smooth"):
        if not isinstance(section.get(key, False), bool):
            raise check.fail([*at, key], "must be true or false")
    normalize = section.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise check.fail([*at, "normalize"], "must be true, false or null (the method's default)")
    if method == "slerp" and (section.get("smooth") or filters):
        raise check.fail([*at, "merge_method"], "slerp genomes take neither smooth nor filters (as mergekit-evolve)")
    dtype = section.get("dtype", "bfloat16")
    if dtype not in ("float32", "bfloat16", "float16", "float64"):
        raise check.fail([*at, "dtype"], "must be float32, bfloat16, float16 or float64")
    out_format = section.get("out_format", "model")
    if out_format not in ("model", "adapter"):
        raise check.fail([*at, "out_format"], "must be model or adapter")
    if out_format == "adapter":
        # Each candidate a PEFT adapter (concatenated factors, computed in float64): exact only for
        # weighted sums of adapters, and no merge arithmetic dtype applies.
        if method not in ("linear", "task_arithmetic"):
            raise check.fail(
                [*at, "out_format"], f"adapter candidates are exact for linear and task_arithmetic, not {method}"
            )
        if "dtype" in section:
            raise check.fail(
                [*at, "dtype"], "not with out_format: adapter (candidates are computed in float64 on the factors)"
            )
    return GenomeSpec(
        models=tuple(str(r) for r in refs),
        merge_method=str(method),
        base_model=base,
        tokenizer_source=section.get("tokenizer_source"),
        layer_granularity=granularity,
        normalize=normalize,
        allow_negative_weights=bool(section.get("allow_negative_weights", False)),
        filters=tuple(filters),
        smooth=bool(section.get("smooth", False)),
        dtype=str(dtype),
        out_format=str(out_format),
    )


def _cmaes(check: Checker, value: Any, random_init: Any, strategy: str) -> Cmaes:
    keys = ("sigma0", "popsize", "max_evals", "seed", "penalty", "random_init", "dfs_max_evals")
    section = check.keys(["cmaes"], value, keys)
    at: list[str | int] = ["cmaes"]
    if value is not None and strategy not in SEARCHES:
        raise check.fail(["cmaes"], f"cmaes: is for strategies {', '.join(SEARCHES)} (this config's is {strategy})")
    dfs_max_evals = section.get("dfs_max_evals")
    if dfs_max_evals is not None:
        if strategy != "ps+dfs":
            raise check.fail([*at, "dfs_max_evals"], "is the DFS phase's budget of strategy ps+dfs")
        dfs_max_evals = check.integer([*at, "dfs_max_evals"], dfs_max_evals, 1)
    sigma0 = section.get("sigma0", 1 / 6)
    if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or sigma0 <= 0:
        raise check.fail([*at, "sigma0"], "must be a positive number")
    popsize = section.get("popsize")
    if popsize is not None:
        popsize = check.integer([*at, "popsize"], popsize, 2)
    penalty = section.get("penalty")
    if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float))):
        raise check.fail([*at, "penalty"], "must be a number (the score of a failed candidate) or null")
    seed = section.get("seed")
    if seed is not None:
        seed = check.integer([*at, "seed"], seed, 0)
    init = section.get("random_init", random_init)
    if not isinstance(init, bool):
        raise check.fail(["random_init"], "must be true or false")
    return Cmaes(
        sigma0=float(sigma0),
        popsize=popsize,
        max_evals=check.integer([*at, "max_evals"], section.get("max_evals", 100), 1),
        seed=seed,
        penalty=None if penalty is None else float(penalty),
        random_init=init,
        dfs_max_evals=dfs_max_evals,
    )


def parse_dfs(check: Checker, value: Any, strategy: str) -> DfsSpec:
    """The ``dfs:`` section: the source models (A first; ``ps``, the PS phase's best, only in
    ps+dfs), repeats, scaling and the meaning of a scale."""
    at: list[str | int] = ["dfs"]
    if value is None:
        raise check.fail(at, f"strategy {strategy} needs a dfs: section (models, repeats, scaling, scale)")
    section = check.keys(at, value, ("models", "repeats", "scaling", "scale", "dtype"))
    models = section.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise check.fail([*at, "models"], "a list of model references is required (A first)")
    if len(set(models)) != len(models):
        raise check.fail([*at, "models"], "a model appears twice")
    if strategy == "ps+dfs" and models[0] != PS_MODEL:
        raise check.fail([*at, "models"], f"strategy ps+dfs starts from its PS phase's best: {PS_MODEL} comes first")
    if strategy == "dfs" and PS_MODEL in models:
        raise check.fail([*at, "models"], f"{PS_MODEL} names the PS phase's best model, which only ps+dfs has")
    repeats = check.integer([*at, "repeats"], section.get("repeats", 3), 1)
    scaling = check.choice([*at, "scaling"], section.get("scaling", "matrix"), SCALINGS)
    meaning = check.choice([*at, "scale"], section.get("scale", "residual"), SCALE_MEANINGS)
    dtype = section.get("dtype")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16", "float64"):
        raise check.fail([*at, "dtype"], "must be float32, bfloat16, float16 or float64")
    return DfsSpec(tuple(models), repeats, scaling, meaning, dtype)


def _objective(check: Checker, value: Any) -> Mapping[str, float] | None:
    section = check.keys(["objective"], value, ("weights",))
    weights = section.get("weights")
    if weights is None:
        return None
    if not isinstance(weights, Mapping) or not weights:
        raise check.fail(["objective", "weights"], "must map task names to weights")
    for task, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise check.fail(["objective", "weights", task], "must be a number")
    if all(float(w) == 0 for w in weights.values()):
        raise check.fail(["objective", "weights"], "every weight is zero")
    return {str(k): float(v) for k, v in weights.items()}
