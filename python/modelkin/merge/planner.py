"""Planning a merge: the recipe's models resolved and opened (headers only), every output tensor's
inputs and parameters decided, and the engine's typed job built from that, before any tensor is
read."""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .._core import ModelHandle, open_model
from ..io.adapter import AdapterLayout, apply_adapter, resolve_adapted
from ..io.dtypes import TORCH_NAMES, compute_name
from ..io.errors import ModelReferenceError
from ..io.resolve import resolve
from ..io.safetensors import Dtype, decode_tensor, read_tensor
from ..io.towers import Vlm, read_vlm
from .architecture import COUNT_KEYS, layer_naming
from .job import ComputeName, MergeInput, MergeJob, OutDtypeName, RamOptions, SphericalOptions, TensorRecipe
from .layout import PlannedOutput, merged_inputs, plan_models, plan_slices, text_stack
from .mkl import mkl_library
from .modules import plan_recipe_modules, whole_vlm_of
from .output import model_dir, read_json
from .parameters import global_options, layer_of, lookup
from .recipe import MergeConfig, ModelEntry, RecipeError, check_range, load_config, out_dtype_name
from .sources import stacked_layers

# Memory magnitude pruning (ties, breadcrumbs) may use per tensor to split ties at its threshold
# exactly as torch's sort does; None leaves the engine's default (512 MiB). Tests lower it to
# exercise the streamed rule.
SORT_ORDER_BYTES: int | None = None

# (size, mtime in ns, inode) of a model file: a file replaced by a copy with the same size and
# time (rsync, cp -p) is a new inode.
Stamp = tuple[int, int, int]
# The stamps of one model's safetensors files (and index), by file path, sorted.
Stamps = tuple[tuple[str, Stamp], ...]
# (name, shape, safetensors dtype) of every tensor of a model, in storage order.
Listing = list[tuple[str, list[int], str]]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor of a plan: what it is made from."""

    name: str
    # (model reference, tensor name in that model) of every merged input, in the recipe's order.
    inputs: tuple[tuple[str, str], ...]
    # The base model's tensor name, for methods that read the base.
    base_tensor: str | None


@dataclass(frozen=True)
class MergePlan:
    """A validated, resolved merge: what will be merged and how, before anything is read.

    Made by :func:`modelkin.plan`; run by :func:`modelkin.merge` (to disk or in memory). A plan
    remembers the size, modification time and inode of every model file it opened, and a merge refuses
    to run a plan whose models changed on disk since."""

    config: MergeConfig
    # Model reference → local path, every model of the recipe (for an adapted model, its base's).
    paths: dict[str, Path]
    base: str | None
    # The merged models (the base excluded unless the method averages it in), in recipe order.
    entries: tuple[ModelEntry, ...]
    outputs: tuple[PlannedOutput, ...]
    base_config: dict[str, Any] | None
    # The method's global options, resolved (defaults from the method table).
    options: dict[str, Any]
    out_dtype: OutDtypeName
    compute: ComputeName
    precise: bool
    seed: int
    # Every model's stamps, by its path.
    stamps: dict[Path, Stamps] = field(repr=False)
    # Every model of `paths`, in its order, held open by the core for the merge.
    handles: tuple[ModelHandle, ...] = field(repr=False, compare=False)
    # The engine's tensor recipes, every parameter resolved and checked when planning.
    recipes: tuple[TensorRecipe, ...] = field(repr=False)
    # The dtype config.json names: the output dtype, except where a float32 factor promotes the
    # tensors (ramplus_tl, arcee_fusion): mergekit still names the recipe's dtype there.
    config_dtype: OutDtypeName | None = None
    # Model reference → the LoRA adapter applied to its base (``BASE+ADAPTER``, or a bare adapter).
    adapters: dict[str, AdapterLayout] = field(default_factory=dict)
    # Model reference → a VLM merged through its language model (the output is then that VLM).
    vlms: dict[str, Vlm] = field(default_factory=dict)
    # A `modules:` recipe over VLMs alone: merged whole, module by module; its config, processor
    # and tokenizer files are this VLM's (the base, else the first model).
    whole_vlm: Vlm | None = None

    @property
    def config_dtype_name(self) -> OutDtypeName:
        """The dtype config.json names (see ``config_dtype``)."""
        return self.config_dtype or self.out_dtype

    @property
    def vlm(self) -> Vlm | None:
        """The VLM the merge is written as: the first among the merged models, else the base."""
        for ref in [*(e.model for e in self.entries), *([self.base] if self.base else [])]:
            if ref in self.vlms:
                return self.vlms[ref]
        return next(iter(self.vlms.values()), None)

    @property
    def written_vlm(self) -> Vlm | None:
        """The VLM whose config, processor and tokenizer files the output takes, if any."""
        return self.vlm or self.whole_vlm

    @property
    def method(self) -> str:
        return self.config.method.name

    @property
    def models(self) -> tuple[str, ...]:
        """The merged models' references, in the recipe's order."""
        return tuple(e.model for e in self.entries)

    @property
    def tensors(self) -> tuple[PlannedTensor, ...]:
        return tuple(
            PlannedTensor(name, tuple((e.model, t) for e, t in inputs), base_tensor)
            for name, inputs, base_tensor, _ in self.outputs
        )

    def check_unchanged(self) -> None:
        """Raises ModelReferenceError naming the first model file changed, added or removed since
        planning."""
        for model, now in _stamps(self.stamps).items():
            if now == self.stamps[model]:
                continue
            before, after = dict(self.stamps[model]), dict(now)
            for path in sorted(before.keys() | after.keys()):
                if before.get(path) != after.get(path):
                    what = "added" if path not in before else "removed" if path not in after else "changed"
                    raise ModelReferenceError(f"{path}: {what} on disk since the merge was planned; plan it again")

    def read_tensor(self, ref: str, name: str) -> tuple[Any, Dtype]:
        """One tensor of a model of the plan in float64, with its stored dtype: an adapted model's
        from its handle (the adapter applied), any other's from its file."""
        if ref in self.adapters:
            handle = self.handles[list(self.paths).index(ref)]
            shape, dtype = handle.info(name)
            return decode_tensor(handle.raw(name), cast(Dtype, dtype), shape), cast(Dtype, dtype)
        return read_tensor(self.paths[ref], name)

    def _redirected(self, redirect: Mapping[Any, int]) -> list[TensorRecipe]:
        """The recipes with (model, tensor) pairs sent to the files ``redirect`` names."""
        if not redirect:
            return list(self.recipes)
        refs = list(self.paths)
        out: list[TensorRecipe] = []
        for recipe in self.recipes:
            inputs = [
                {**i, "model": redirect.get((refs[i["model"]], i["tensor"]), i["model"])} for i in recipe["inputs"]
            ]
            base = redirect.get((self.base, recipe["base_tensor"])) if self.base and recipe["base_tensor"] else None
            base = base if base is not None else recipe.get("base_model")
            out.append({**recipe, "inputs": inputs, "base_model": base})  # type: ignore[typeddict-item]
        return out

    def job(self, out_dir: str | None, *, threads: int, max_shard_bytes: int, redirect: Mapping[Any, int]) -> MergeJob:
        """The engine's job; ``redirect`` sends (model, tensor) pairs to extra files appended to
        the model list (a vocabulary laid out in the output tokenizer's order)."""
        options = self.options
        job: MergeJob = {
            # The handles' paths: an adapted model goes by its reference (its base applied in memory).
            "models": [str(h.path) for h in self.handles],
            "base": list(self.paths).index(self.base) if self.base is not None else None,
            "method": self.method,
            "normalize": bool(options.get("normalize", False)),
            "rescale": bool(options.get("rescale", False)),
            "lambda": float(options.get("lambda", 1.0)),
            "seed": self.seed,
            "out_dtype": self.out_dtype,
            "compute": self.compute,
            "out_dir": out_dir,
            "max_shard_bytes": max_shard_bytes,
            "threads": threads,
            "filter_wise": bool(options.get("filter_wise", False)),
            "ram": cast(RamOptions, _options(options, _RAM_OPTIONS)),
            "spherical": cast(SphericalOptions, _options(options, _SPHERICAL_OPTIONS)),
            "tensors": self._redirected(redirect),
            # Provenance compares the parents tensor by tensor; slices mix parents per layer.
            # A VLM merged whole mixes towers modelkin's kinship leaves out.
            "kinship": self.config.slices is None
            and self.whole_vlm is None
            and all(m.models is not None for m in self.config.modules or ()),
        }
        if SORT_ORDER_BYTES is not None:
            job["sort_order_bytes"] = SORT_ORDER_BYTES
        # float32 angles as torch's MKL builds compute them, where MKL is installed (see mkl.py).
        library = mkl_library() if self.compute != "float64" else None
        if library is not None:
            job["mkl"] = library
        return job


# The method's global options the engine reads: recipe key → (job key, type). An option absent
# here has no row in the method table for this method, so the engine keeps its own default.
_RAM_OPTIONS = {"epsilon": ("epsilon", float), "r": ("r", float), "alpha": ("alpha", float)}
_SPHERICAL_OPTIONS = {
    "normalize_weights": ("normalize_weights", bool),
    "eps": ("eps", float),
    "tol": ("tol", float),
    "max_iter": ("max_iter", int),
    # mergekit ignores nuslerp_row_wise while nuslerp_flatten is true (the default); so does the engine.
    "nuslerp_flatten": ("flatten", bool),
    "nuslerp_row_wise": ("row_wise", bool),
}


def _options(options: Mapping[str, Any], keys: Mapping[str, tuple[str, type]]) -> dict[str, Any]:
    return {job_key: kind(options[key]) for key, (job_key, kind) in keys.items() if key in options}


def plan(
    recipe: str | os.PathLike[str] | Mapping[str, Any],
    *,
    seed: int = 0,
    offline: bool = False,
    precise: bool = False,
) -> MergePlan:
    """Validates a mergekit recipe (a YAML path or a dict with the same keys), resolves its models
    and reads their headers: what will be merged, typed, before any tensor is read.

    By default the arithmetic is mergekit's: in the recipe's ``dtype`` (else the inputs' stored
    dtype), rounded after each operation as torch rounds it. ``precise=True`` computes exactly in
    float64 and rounds once to the output dtype."""
    config = load_config(recipe if isinstance(recipe, Mapping) else Path(recipe))
    slice_bases = [m.slice_base for m in config.models if m.slice_base]
    refs = list(
        dict.fromkeys(
            [*(m.model for m in config.models), *([config.base_model] if config.base_model else []), *slice_bases]
        )
    )
    paths, adapters = _resolve_models(refs, config.base_model, offline)
    stamps = _stamps([*paths.values(), *(a.path for a in adapters.values())])
    method = config.method
    # linear and passthrough ignore base_model (as in mergekit); nuslerp and multislerp work on task
    # vectors when one is given; karcher averages it with the models (mergekit 0.1.5 gathers every
    # model of the recipe, base_model included, into the mean).
    base_ref = config.base_model if method.base in ("required", "optional") else None
    inputs = merged_inputs(config, config.models, base_ref)
    # A VLM takes part through its language model, under the text architecture's names; a
    # `modules:` recipe over VLMs alone merges them whole, module by module, as mergekit does.
    vlms = {ref: vlm for ref, path in paths.items() if ref not in adapters and (vlm := read_vlm(path)) is not None}
    whole_vlm = whole_vlm_of(config, paths, vlms)
    if whole_vlm is not None:
        vlms = {}
    # Every model's header, read once: the reference's tensor names, and each model's stored dtype.
    opened = {ref: _opened_model(ref, path, adapters, vlms, stamps) for ref, path in paths.items()}
    if (vlms or whole_vlm) and config.tokenizer is not None:
        raise RecipeError("a merge into a VLM takes no tokenizer or tokenizer_source (the VLM's tokenizer is kept)")
    listings = {ref: listing for ref, (_, listing) in opened.items()}
    reference = base_ref or inputs[0].model
    base_config = (
        dict(vlms[reference].text_config)
        if reference in vlms
        else dict(whole_vlm.text_config)
        if whole_vlm is not None
        else read_json(model_dir(paths[reference]) / "config.json")
    )
    tensors = listings[reference]
    names = [n for n, _, _ in tensors]
    counts = [int(v) for k in COUNT_KEYS if isinstance(v := (base_config or {}).get(k), int)]
    layers = counts[0] if counts else 0
    if not layers:
        found = [layer_of(n) for n in names]
        layers = max((x for x in found if x is not None), default=0) + 1
    options = global_options(config)
    if config.modules is not None:
        outputs, base_config = plan_recipe_modules(config, names, base_ref, base_config, reference, whole_vlm)
    elif config.slices is None:
        outputs = plan_models(names, base_ref, inputs, layers)
    else:
        naming = layer_naming(base_config, names, reference)
        outputs = plan_slices(config, config.slices, text_stack(names, naming), base_ref)
        base_config = {**(base_config or {}), naming.count_key: stacked_layers(config.slices)}
    out_dtype = cast(OutDtypeName, out_dtype_name(config, base_config, tensors[0][2] if tensors else None))
    compute: ComputeName = (
        "float64" if precise else arithmetic_dtype(config.dtype, [_stored_dtype(t) for t in listings.values()])
    )
    config_dtype = out_dtype
    if method.info.float32_result and config.out_dtype is None and compute in ("bfloat16", "float16"):
        out_dtype = "F32"  # a float32 factor promotes the result, and mergekit writes it so
    return MergePlan(
        config=config,
        paths=paths,
        base=base_ref,
        entries=tuple(inputs),
        outputs=tuple(outputs),
        base_config=base_config,
        options=options,
        out_dtype=out_dtype,
        compute=compute,
        precise=precise,
        seed=seed,
        stamps=stamps,
        handles=tuple(handle for handle, _ in opened.values()),
        # Every per-tensor parameter resolved and checked now, not when the merge runs.
        recipes=tuple(_with_fusion_draws(config, _recipes(config, list(paths), outputs), tensors, options)),
        adapters=adapters,
        vlms=vlms,
        config_dtype=config_dtype,
        whole_vlm=whole_vlm,
    )


def _resolve_models(
    refs: list[str], base_model: str | None, offline: bool
) -> tuple[dict[str, Path], dict[str, AdapterLayout]]:
    """Every reference's local path, and the adapter of each adapted one: ``BASE+ADAPTER``, or a
    bare adapter (applied to the base its config names, or when that is not on this machine to the
    recipe's base_model)."""
    paths: dict[str, Path] = {}
    adapters: dict[str, AdapterLayout] = {}
    base_path: Path | None = None
    if base_model is not None:
        found = resolve_adapted(base_model, offline=offline)
        base_path = found[0] if found is not None else resolve(base_model, offline=offline)
    for ref in refs:
        found = resolve_adapted(ref, base=None if ref == base_model else base_path, offline=offline)
        if found is None:
            paths[ref] = resolve(ref, offline=offline)
        else:
            paths[ref], adapters[ref] = found
    return paths, adapters


def _opened_model(
    ref: str, path: Path, adapters: Mapping[str, AdapterLayout], vlms: Mapping[str, Vlm], stamps: Mapping[Path, Stamps]
) -> tuple[ModelHandle, Listing]:
    """A model of the plan held open: an adapter applied to its base, a VLM's language model, or
    the model's own files."""
    if ref in adapters:
        return _opened_adapted(ref, path, adapters[ref], stamps)
    if ref in vlms:
        return _cached((Path(f"{path}#language_model"), stamps[path]), lambda: vlms[ref].language_model(ref))
    return _opened(path, stamps[path])


def _opened_adapted(
    ref: str, base: Path, adapter: AdapterLayout, stamps: Mapping[Path, Stamps]
) -> tuple[ModelHandle, Listing]:
    """The base with the adapter applied (see :func:`..io.adapter.apply_adapter`), held open: made
    once per version of both models' files."""
    key = (Path(f"{base}+{adapter.path}"), stamps[base] + stamps[adapter.path])
    return _cached(key, lambda: apply_adapter(base, adapter, ref))


# Models opened by recent plans, by path and the stamps of their files: an evolution plans hundreds
# of merges of the same parents, and a model is mapped and its header read again only when one of
# its files changed. Few are kept: an open model holds its files (a deleted candidate's disk space
# comes back when it falls out), though no memory between merges (the engine lets its pages go).
_OPEN: OrderedDict[tuple[Path, Stamps], tuple[ModelHandle, Listing]] = OrderedDict()
_KEEP_OPEN = 8
_OPEN_LOCK = threading.Lock()


def _opened(path: Path, stamps: Stamps) -> tuple[ModelHandle, Listing]:
    """The model at ``path`` held open, and its tensor listing: opened once per version of its files."""
    return _cached((path, stamps), lambda: open_model(path))


def _cached(key: tuple[Path, Stamps], make: Callable[[], ModelHandle]) -> tuple[ModelHandle, Listing]:
    """The handle kept under ``key`` (a path and its files' stamps), else made by ``make`` and kept;
    an older version of the same path is let go first."""
    with _OPEN_LOCK:
        found = _OPEN.get(key)
        if found is not None:
            _OPEN.move_to_end(key)
            return found
        for stale in [k for k in _OPEN if k[0] == key[0]]:
            del _OPEN[stale]  # its files changed: let the old ones go now
    handle = make()
    found = (handle, handle.tensors())
    with _OPEN_LOCK:
        _OPEN[key] = found
        while len(_OPEN) > _KEEP_OPEN:
            _OPEN.popitem(last=False)
    return found


def _stamps(paths: Iterable[Path]) -> dict[Path, Stamps]:
    """The stamps of every model's safetensors files (and index). Plain strings and ``os`` calls:
    a plan takes them twice per merge of many candidates."""
    stamps: dict[Path, Stamps] = {}
    for path in paths:
        files: list[tuple[str, Stamp]] = []
        try:
            if os.path.isfile(path):
                found = os.stat(path)
                files.append((os.fspath(path), (found.st_size, found.st_mtime_ns, found.st_ino)))
            else:
                with os.scandir(path) as entries:
                    for entry in entries:
                        if ".safetensors" in entry.name and entry.is_file():
                            found = entry.stat()
                            files.append((entry.path, (found.st_size, found.st_mtime_ns, found.st_ino)))
        except OSError:
            pass  # gone meanwhile: check_unchanged reports its files as removed
        stamps[path] = tuple(sorted(files))
    return stamps


def _recipes(config: MergeConfig, refs: list[str], outputs: list[PlannedOutput]) -> list[TensorRecipe]:
    """The engine's tensor recipes, every parameter looked up per tensor and checked against the
    method table's ranges."""
    index = {ref: i for i, ref in enumerate(refs)}
    method = config.method
    # passthrough's `scale` is the factor its one input is multiplied by: it travels as the weight.
    keys = {"weight": "scale" if "scale" in method.parameters else "weight", "density": "density"}
    keys.update(gamma="gamma", epsilon="epsilon")
    della = method.info.sparsification == "della"
    # Keyed by the entry, not its model: a model in several slices has each slice's parameters.
    per_entry: dict[int, dict[str, float | None]] = {}
    tensors: list[TensorRecipe] = []
    for name, inputs, base_tensor, t in outputs:
        entries: list[MergeInput] = []
        for entry, source_name in inputs:
            fixed = per_entry.get(id(entry))
            if fixed is None:
                fixed = per_entry[id(entry)] = {k: _fixed(config, entry, key) for k, key in keys.items()}
            values = {
                k: _value(config, entry, key, name, t) if (v := fixed[k]) is None else v for k, key in keys.items()
            }
            density, epsilon = values["density"], values["epsilon"]
            if della and 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                raise RecipeError(
                    f"della needs density ± epsilon inside (0, 1): {density} ± {epsilon} for {entry.model} at {name}"
                )
            entries.append({"model": index[entry.model], "tensor": source_name, **values})  # type: ignore[typeddict-item]
        first = inputs[0][0] if inputs else None
        shared = first.shared if first else ()
        # A slice's own base_model: read for this tensor instead of the job's base.
        base_model = index[first.slice_base] if first and first.slice_base and base_tensor else None
        tensors.append(
            {
                "name": name,
                "base_tensor": base_tensor,
                "base_model": base_model,
                "inputs": entries,
                "t": float(lookup(config, None, "t", name, t, 0.0, shared)),
                "select_topk": float(lookup(config, None, "select_topk", name, t, 1.0, shared)),
            }
        )
    return tensors


# arcee_fusion: mergekit estimates the quartiles of tensors past a million entries from a sample of
# a million drawn with torch's generator, in the order its executor runs the tensors (by name).
_FUSION_SAMPLE = 1_000_000


def _with_fusion_draws(
    config: MergeConfig, recipes: list[TensorRecipe], listing: Listing, options: Mapping[str, Any]
) -> list[TensorRecipe]:
    """arcee_fusion's recipes with the draws mergekit's process makes before each tensor (its
    generator seeded with the merge's seed, as ``--random-seed`` seeds it), unless the recipe asks
    for the exact quartiles (``exact_quantiles: true``)."""
    if config.method.name != "arcee_fusion" or options.get("exact_quantiles"):
        return recipes
    sizes = {name: math.prod(shape) for name, shape, _ in listing}
    sampled = sorted(r["name"] for r in recipes if sizes.get(r["base_tensor"] or r["name"], 0) > _FUSION_SAMPLE)
    before = {name: i * _FUSION_SAMPLE for i, name in enumerate(sampled)}
    return [{**r, "draws_before": before.get(r["name"], 0)} for r in recipes]


_TENSOR_DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.0, "epsilon": 0.0}


def _fixed(config: MergeConfig, entry: ModelEntry, key: str) -> float | None:
    """A per-model parameter's value when it is the same at every tensor (a plain number, or
    absent: the table's default), else None. A plain number was range-checked with the recipe."""
    for params in (*entry.scopes, config.parameters):
        if key in params:
            value = params[key]
            return float(value) if isinstance(value, (int, float)) else None
    return float(config.method.tensor_defaults.get(key, _TENSOR_DEFAULTS.get(key, 0.0)))  # type: ignore[arg-type]


def _value(config: MergeConfig, entry: ModelEntry, key: str, tensor: str, t: float | None) -> float:
    """A per-model parameter's value at one tensor (a gradient or filters), checked against the
    method table's range."""
    method = config.method
    fallback = float(method.tensor_defaults.get(key, _TENSOR_DEFAULTS.get(key, 0.0)))  # type: ignore[arg-type]
    found = float(lookup(config, entry, key, tensor, t, fallback))

    def fail(message: str) -> RecipeError:
        return RecipeError(f"{message}, for {entry.model} at tensor {tensor}")

    check_range(method, key, [found], fail)
    return found


def arithmetic_dtype(dtype: str | None, stored: list[str | None]) -> ComputeName:
    """The dtype mergekit computes in: the recipe's ``dtype``, else the inputs' stored dtypes promoted
    as torch promotes them (bf16 with f16 gives float32)."""
    if dtype is not None:
        return compute_name(dtype)
    kinds = {TORCH_NAMES.get(s or "", "float32") for s in stored}
    if len(kinds) == 1:
        return kinds.pop()
    return "float64" if "float64" in kinds else "float32"


def _stored_dtype(tensors: list[tuple[str, list[int], str]]) -> str | None:
    """The stored dtype of a model's first floating tensor."""
    return next((d for _, _, d in tensors if d in ("F64", "F32", "F16", "BF16")), None)
