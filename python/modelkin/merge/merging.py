"""Running a merge: a plan (see planner.py) handed to the Rust engine, the merged model written to
a directory (atomically: a temp directory renamed into place) or held in memory."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from .._core import KinshipStats, ModelHandle, open_model, run_merge
from ..io.adapter import WEIGHTS
from ..io.errors import RecipeError
from ..io.resident import TOKENIZER_FILES, ResidentModel
from ..io.resolve import resolve
from ..io.staging import remove_stale, staging_dir
from ..kinship.measure import METRICS, KinshipMatrix
from .adapter_output import write_adapter_merge
from .chat_template import resolve_template, write_template
from .output import check_output, model_dir, output_config, parse_size, publish, write_metadata
from .planner import MergePlan, plan
from .vlm_output import as_vlm, vlm_config, vlm_metadata, write_processor_files
from .vocabulary import VOCAB_TENSOR, OutputVocabulary, lay_out, write_tokenizer
from .vocabulary import build as build_vocabulary

if TYPE_CHECKING:
    from .recipe import MergeConfig

Recipe = str | os.PathLike[str] | Mapping[str, Any]


@dataclass(frozen=True)
class MergeResult:
    """Where a merge was written and the provenance recorded beside it."""

    path: Path
    method: str
    parents: tuple[str, ...]
    base: str | None
    kinship: KinshipMatrix | None
    bytes_written: int


class MergedModel(ResidentModel):
    """A merged model held in memory, as ``modelkin.merge(plan)`` without an output returns it.

    Indexing by tensor name gives a read-only numpy array in the output dtype (bfloat16 as
    ``ml_dtypes.bfloat16``) that shares the engine's buffer: nothing is copied into Python. The
    whole model takes its own size in memory; the merge that made it needed only the engine's
    bounded working set on top. It can be saved (``save``) or handed to ``modelkin.kinship`` as a
    model, without being written."""

    def __init__(self, plan: MergePlan, tensors: ModelHandle, kinship: KinshipMatrix | None, extras: _Extras) -> None:
        super().__init__(tensors)
        self.plan = plan
        self.kinship = kinship
        self._extras = extras

    @property
    def names(self) -> tuple[str, ...]:
        """The merged models' references (the parents), in the recipe's order."""
        return self.plan.models

    @property
    def label(self) -> str:
        return f"<merged {self.plan.method} in memory {id(self.handle):#x}>"

    @property
    def config(self) -> dict[str, Any] | None:
        """The config.json the merge writes (dtype keys set to the output dtype)."""
        base = self._extras.base_config
        if self.plan.written_vlm is not None:
            return vlm_config(self.plan, base)
        return None if base is None else output_config(base, self.plan.config_dtype_name)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The model directory whose tokenizer files (and generation config) the merge copies: the
        base's, else the first model's. None when the merge makes its own (a ``tokenizer:`` or
        ``chat_template:`` request)."""
        config = self.plan.config
        if config.tokenizer is not None or config.chat_template is not None:
            return None
        if self.plan.written_vlm is not None:
            return self.plan.written_vlm.path
        return model_dir(self.plan.paths[self.plan.base or self.plan.entries[0].model])

    def __repr__(self) -> str:
        return f"MergedModel({self.plan.method}, {len(self)} tensors, {self.nbytes / 1e6:.1f} MB)"

    def save(self, out: str | os.PathLike[str], *, overwrite: bool = False, out_shard_size: str | int = "5GB") -> Path:
        """Writes exactly what ``modelkin merge`` writes for the same plan into directory ``out``,
        atomically (a temp directory renamed into place)."""
        out_path = Path(out)
        check_output(out_path, list(self.plan.paths.values()), overwrite)
        with _staging(out_path) as staging:
            self.handle.save(str(staging), parse_size(out_shard_size))
            _finish(self.plan, staging, self.kinship, self._extras)
            publish(staging, out_path)
        return out_path


@dataclass(frozen=True)
class _Extras:
    """What the output files need beyond the tensors, decided while merging."""

    base_config: dict[str, Any] | None
    vocabulary: OutputVocabulary | None
    template: str | None


@overload
def merge(
    recipe: Recipe | MergePlan,
    out: None = None,
    *,
    overwrite: bool = False,
    seed: int | None = None,
    threads: int = 0,
    out_shard_size: str | int = "5GB",
    offline: bool | None = None,
    precise: bool | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> MergedModel: ...


@overload
def merge(
    recipe: Recipe | MergePlan,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    seed: int | None = None,
    threads: int = 0,
    out_shard_size: str | int = "5GB",
    offline: bool | None = None,
    precise: bool | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> MergeResult: ...


def merge(
    recipe: Recipe | MergePlan,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    seed: int | None = None,
    threads: int = 0,
    out_shard_size: str | int = "5GB",
    offline: bool | None = None,
    precise: bool | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> MergeResult | MergedModel:
    """Runs a merge: a plan from :func:`modelkin.plan`, or a mergekit recipe (a YAML path or a dict
    with the same keys) planned here with ``seed``, ``offline`` and ``precise``.

    With ``out`` the merged model is streamed into that directory (what ``modelkin merge`` writes)
    and a :class:`MergeResult` is returned. Without it the merged model is returned in memory as a
    :class:`MergedModel`: it takes the merged model's size, plus the engine's bounded working set
    while merging. Either way the parents' kinship against the base is measured in the same pass.

    By default the arithmetic is mergekit's: in the recipe's ``dtype`` (else the inputs' stored
    dtype), rounded after each operation as torch rounds it, so the output has mergekit's bits.
    ``precise=True`` computes exactly in float64 and rounds once to the output dtype."""
    if isinstance(recipe, MergePlan):
        given = {"seed": seed, "offline": offline, "precise": precise}
        if any(v is not None for v in given.values()):
            named = ", ".join(k for k, v in given.items() if v is not None)
            raise ValueError(f"{named}: set when planning (modelkin.plan), not when merging a plan")
        planned = recipe
        planned.check_unchanged()
    else:
        planned = plan(recipe, seed=seed or 0, offline=bool(offline), precise=bool(precise))
    for message in planned.config.ignored:
        print(f"warning: {message}", file=sys.stderr)
    shard_bytes = parse_size(out_shard_size)
    if planned.config.out_format == "adapter":
        return _merge_to_adapter(planned, out, overwrite)
    if out is None:
        if planned.config.tokenizer is None:
            outcome, extras = _run(planned, None, None, threads, shard_bytes, progress)
        else:
            with tempfile.TemporaryDirectory(prefix="modelkin-vocabulary-") as scratch:
                outcome, extras = _run(planned, None, Path(scratch), threads, shard_bytes, progress)
        assert outcome.model is not None
        handle = outcome.model
        if planned.vlm is not None:
            handle = as_vlm(planned, handle, str(handle.path))
        return MergedModel(planned, handle, _kinship(planned, outcome.kinship), extras)
    out_path = Path(out)
    check_output(out_path, list(planned.paths.values()), overwrite)
    with _staging(out_path) as staging:
        # A merge into a VLM: its language model is merged into a directory of its own first, then
        # written with the VLM's other tensors under the VLM's names.
        tensors_dir = staging / ".language_model" if planned.vlm is not None else staging
        tensors_dir.mkdir(exist_ok=True)
        outcome, extras = _run(planned, tensors_dir, staging / ".vocabulary", threads, shard_bytes, progress)
        shutil.rmtree(staging / ".vocabulary", ignore_errors=True)
        if planned.vlm is not None:
            as_vlm(planned, open_model(tensors_dir), str(out_path)).save(str(staging), shard_bytes)
            shutil.rmtree(tensors_dir)
        kinship = _kinship(planned, outcome.kinship)
        _finish(planned, staging, kinship, extras)
        publish(staging, out_path)
    return MergeResult(out_path, planned.method, planned.models, planned.base, kinship, int(outcome.bytes_written))


def _merge_to_adapter(planned: MergePlan, out: str | os.PathLike[str] | None, overwrite: bool) -> MergeResult:
    """``out_format: adapter``: the merge written as a PEFT adapter (see :mod:`.adapter_output`)."""
    if out is None:
        raise RecipeError("out_format: adapter writes a directory: give an output path")
    out_path = Path(out)
    check_output(out_path, [*planned.paths.values(), *(a.path for a in planned.adapters.values())], overwrite)
    with _staging(out_path) as staging:
        written = write_adapter_merge(planned, staging)
        size = (staging / WEIGHTS).stat().st_size
        publish(staging, out_path)
    if planned.config.adapter_rank is not None:
        print(
            f"adapter_rank {planned.config.adapter_rank}: {len(written.errors)} modules reduced, dropped"
            f" Frobenius norm {written.total_error:.6g} in total (per module in modelkin.json)",
            file=sys.stderr,
        )
    return MergeResult(out_path, planned.method, planned.models, planned.base, None, size)


class _staging:
    """A temp directory beside ``out`` named after this process (see io/staging.py), removed
    unless published; a dead writer's left beside ``out`` is removed first. OSError messages name
    ``out``."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> Path:
        parent = self.out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent / self.out.name)
        self.path = staging_dir(parent / self.out.name)
        return self.path

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        if kind is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, _Reported):
            message = str(error).replace(str(self.path), str(self.out))
            raise _Reported(f"{message} (nothing was written to {self.out})") from error


class _Reported(OSError):
    """An OSError whose message already names the output."""


def _run(
    planned: MergePlan,
    out_dir: Path | None,
    scratch: Path | None,
    threads: int,
    shard_bytes: int,
    progress: Callable[[int, int], object] | None,
) -> tuple[Any, _Extras]:
    config = planned.config
    base_config = planned.base_config
    redirect: dict[tuple[str, str], int] = {}
    vocabulary = None
    job_models = len(planned.paths)
    extra_files: list[str] = []
    if config.tokenizer is not None:
        assert scratch is not None
        vocabulary, files = _lay_out_vocabulary(planned, scratch)
        for key, file in files.items():
            redirect[key] = job_models + len(extra_files)
            extra_files.append(str(file))
        if base_config is not None:
            base_config = {**base_config, "vocab_size": vocabulary.rows}
    template = None
    if config.chat_template is not None:
        template = resolve_template(config.chat_template, [model_dir(p) for p in planned.paths.values()])
    job = planned.job(
        str(out_dir) if out_dir is not None else None, threads=threads, max_shard_bytes=shard_bytes, redirect=redirect
    )
    job["models"] = [*job["models"], *extra_files]
    outcome = run_merge(job, models=planned.handles, progress=progress)
    return outcome, _Extras(base_config, vocabulary, template)


def _kinship(planned: MergePlan, stats: KinshipStats | None) -> KinshipMatrix | None:
    if stats is None:
        return None
    return KinshipMatrix(
        names=planned.models,
        base=planned.base or "",
        mode="full",
        metrics={m: stats.matrix(m, "full") for m in METRICS},
        n=stats.elements,
        tensors=len(stats.tensor_names),
        skipped=tuple(stats.skipped),
    )


def _finish(planned: MergePlan, staging: Path, kinship: KinshipMatrix | None, extras: _Extras) -> None:
    """Everything beside the tensors: config, tokenizer, template, card, provenance."""
    config: MergeConfig = planned.config
    options = {**planned.options, "arithmetic": planned.compute if not planned.precise else "float64 (precise)"}
    write_metadata(
        staging,
        config,
        planned.paths,
        planned.base,
        list(planned.entries),
        planned.config_dtype_name,
        extras.base_config,
        options,
        kinship,
        planned.models,
        **vlm_metadata(planned, extras.base_config),
    )
    if extras.vocabulary is not None:
        write_tokenizer(extras.vocabulary, staging, TOKENIZER_FILES)
    if extras.template is not None:
        write_template(staging, extras.template)
    elif config.chat_template == "auto":
        print("warning: chat_template: auto found no template among the models; none written", file=sys.stderr)
    if planned.written_vlm is not None:
        write_processor_files(planned, staging)


def _lay_out_vocabulary(planned: MergePlan, scratch: Path) -> tuple[OutputVocabulary, dict[tuple[str, str], Path]]:
    """The output vocabulary and every token-indexed input laid out in its order (scratch files)."""
    config = planned.config
    assert config.tokenizer is not None
    refs = list(planned.paths)
    token_base = config.base_model or refs[0]
    source = config.tokenizer.source
    locations = dict(planned.paths)
    if source not in ("base", "union") and source not in locations:
        locations[source] = resolve(source)
    vocabulary = build_vocabulary(config.tokenizer, token_base, refs, locations)
    tensors: dict[str, list[tuple[str, str]]] = {}
    for name, inputs, base_tensor, _ in planned.outputs:
        if VOCAB_TENSOR.search(name):
            feeds = [(planned.base, base_tensor)] if planned.base and base_tensor else []
            tensors[name] = feeds + [(entry.model, tensor) for entry, tensor in inputs]
    return vocabulary, lay_out(vocabulary, config.tokenizer, token_base, tensors, planned.read_tensor, scratch)
