"""lm-eval kept resident in a worker process: its ``hf`` model is built once, as ``simple_evaluate``
builds it (``create_from_arg_string`` with the same arguments, so every ``model_args`` key means what
it means to lm-eval), and each later candidate's tensors are copied into the model's parameters in
place. The task objects are built once per split, and each task's requests once: a request holds a
prompt and its generation arguments, which depend on the data and the tokenizer, never the weights.

A candidate is copied in only when it is the same model up to its weights: the same config.json
(ignoring the keys that only label it, and keys the model's config class does not define, which
transformers' own modelling code never reads: a fine-tune's training notes; all keys count with
``trust_remote_code``), the same tensor names and shapes, and the same tokenizer files. Anything
else (a stacked merge with more layers, another tokenizer) builds the model again, which gives
lm-eval's own result. Where the model cannot be updated in place at all (a checkpoint name
transformers renames on loading, a parameter no tensor fills), it is built for every candidate and a
line on stderr says so.

torch and lm_eval are imported only here, when the first evaluation runs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io.resident import TOKENIZER_FILES, TORCH_VIEWS, AdaptedModel, ResidentModel, StoredModel
from ..merge.merging import MergedModel

# config.json keys that label a checkpoint without changing the model it builds.
_LABEL_KEYS = ("_name_or_path", "transformers_version")


class ResidentLM:
    """One lm-eval ``hf`` model and its tasks, kept between evaluations (one per worker process)."""

    def __init__(
        self, settings: Mapping[str, Any], arguments: Callable[[str], str], manager: Callable[[str], Any]
    ) -> None:
        """``arguments(path)`` is lm-eval's model argument string for a model directory,
        ``manager(arguments)`` the TaskManager simple_evaluate would use with those arguments."""
        self.settings = settings
        self.arguments = arguments
        self.manager = manager
        self.lm: Any = None
        # Models built (the first, and every candidate that is not the same model up to its weights).
        self.builds = 0
        self._identity: tuple[Any, ...] | None = None
        # The config keys the built model's config class defines (None: every key counts).
        self._known: frozenset[str] | None = None
        self._targets: dict[str, Any] | None = None
        self._tasks: dict[str, list[Any]] = {}
        self._manager: Any = None
        self._pretrained = ""
        self._warned = False

    @property
    def task_manager(self) -> Any:
        """lm-eval's TaskManager, built once (with the metadata simple_evaluate would give it)."""
        if self._manager is None:
            self._manager = self.manager(self.arguments(self._pretrained))
        return self._manager

    def load(self, model: str | ResidentModel) -> Any:
        """The lm-eval model holding ``model``'s weights: the kept one with the tensors copied in,
        or a new one when ``model`` differs from it in more than its weights."""
        held = StoredModel(model) if isinstance(model, str) else model
        if self.lm is not None and _identity(held, self._known) == self._identity and self._targets is not None:
            self._copy_in(held)
        else:
            self._build(held)
            self._known = self._config_keys()
            self._identity = _identity(held, self._known)
        return self.lm

    def _config_keys(self) -> frozenset[str] | None:
        if "trust_remote_code" in str(self.settings.get("model_args") or ""):
            return None  # remote code may read any key
        config: Any = getattr(getattr(self.lm, "model", None), "config", None)
        try:
            return frozenset(type(config)().to_dict())
        except Exception:  # a config class that needs arguments: every key counts
            return None

    def tasks(self, split: str, names: Sequence[str]) -> list[Any]:
        """The split's task objects, each building its requests once; task names (loaded by lm-eval
        on every call) when a name stands for a group rather than one task."""
        if split not in self._tasks:
            from lm_eval.api.task import Task
            from lm_eval.tasks import get_task_dict

            _cache_templates()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = get_task_dict(list(names), self.task_manager)
            if set(loaded) == set(names) and all(isinstance(t, Task) for t in loaded.values()):
                self._tasks[split] = [_requests_once(loaded[n]) for n in names]
            else:
                self._tasks[split] = list(names)
        return self._tasks[split]

    def _build(self, model: ResidentModel) -> None:
        from lm_eval.api.registry import get_model

        self.lm, self._targets = None, None
        gc.collect()  # the previous model's memory goes before the next one is made
        settings = self.settings
        config = {"batch_size": settings.get("batch_size", 1), "max_batch_size": None, "device": settings.get("device")}
        with _directory(model) as directory:
            if not self._pretrained:
                self._pretrained = str(_tokenizer_dir(model) or directory)
            lm = get_model(settings.get("model", "hf")).create_from_arg_string(self.arguments(directory), config)
        self.lm = lm
        self.builds += 1
        self._targets, missing = _targets(lm, model)
        if self._targets is None and not self._warned:
            self._warned = True
            print(
                f"warning: lm_eval resident: the model cannot be updated in place ({missing}); it is built again"
                " for every candidate",
                file=sys.stderr,
            )

    def _copy_in(self, model: ResidentModel) -> None:
        import torch

        assert self._targets is not None
        with torch.no_grad():
            for name, target in self._targets.items():
                # copy_ rounds as from_pretrained's cast to the model's dtype does (nearest even).
                target.copy_(model.torch_tensor(name))


def _targets(lm: Any, model: ResidentModel) -> tuple[dict[str, Any] | None, str]:
    """Each checkpoint tensor's parameter in the built model, when every tensor of the model's state
    is filled by one of them (tied weights share storage); else None and what stands in the way."""
    module = getattr(lm, "model", None)
    if module is None or not hasattr(module, "state_dict"):
        return None, f"lm-eval's {type(lm).__name__} holds no torch model"
    state = module.state_dict()
    targets: dict[str, Any] = {}
    for name in model.tensor_names:
        shape, dtype = model.handle.info(name)
        target = state.get(name)
        if target is None:
            return None, f"tensor {name} is not a parameter of the loaded model"
        if list(target.shape) != list(shape) or dtype not in TORCH_VIEWS:
            return None, f"tensor {name} is {dtype} {shape}, the parameter {list(target.shape)}"
        targets[name] = target
    filled = {t.data_ptr() for t in targets.values()}
    unfilled = [k for k, t in state.items() if t.numel() and t.data_ptr() not in filled]
    if unfilled:
        return None, f"no tensor fills {unfilled[0]}"
    return targets, ""


def _identity(model: ResidentModel, known: frozenset[str] | None) -> tuple[Any, ...]:
    """What must match for a candidate's weights to be copied into the kept model."""
    config = {k: v for k, v in (model.config or {}).items() if k not in _LABEL_KEYS and (known is None or k in known)}
    layout = tuple((name, tuple(model.handle.info(name)[0])) for name in model.tensor_names)
    tokenizer = _tokenizer_dir(model)
    files = _fingerprint(tokenizer) if tokenizer is not None else (id(model),)  # its own: built again
    return json.dumps(config, sort_keys=True, default=str), layout, files


def _tokenizer_dir(model: ResidentModel) -> Path | None:
    if isinstance(model, StoredModel):
        return model.path if model.path.is_dir() else model.path.parent
    if isinstance(model, MergedModel | AdaptedModel):
        return model.tokenizer_dir
    return None


def _fingerprint(directory: Path) -> tuple[tuple[str, str], ...]:
    """The tokenizer files (and generation config) of a model directory, by content."""
    found = []
    for file in sorted(directory.iterdir()):
        if file.is_file() and TOKENIZER_FILES.match(file.name):
            stat = file.stat()
            found.append((file.name, _digest(str(file), stat.st_size, stat.st_mtime_ns)))
    return tuple(found)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def _directory(model: ResidentModel) -> Any:
    """A directory lm-eval can build ``model`` from: its own, or a merged model saved for the time
    of the build (the model reads its weights into memory; the files are removed after)."""
    if isinstance(model, StoredModel) and model.path.is_dir():
        yield str(model.path)
        return
    if not isinstance(model, MergedModel | AdaptedModel):
        raise TypeError(f"lm_eval cannot build a model from {model.label}")
    scratch = Path(tempfile.mkdtemp(prefix="modelkin-lmeval-"))
    try:
        yield str(model.save(scratch / "model"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _requests_once(task: Any) -> Any:
    """Makes ``task`` build its requests once per set of arguments: later evaluations get the same
    requests with their responses cleared (lm-eval appends each evaluation's responses to them)."""
    if getattr(task, "_modelkin_requests_once", False):
        return task
    build: Callable[..., Any] = task.build_all_requests
    built: dict[str, list[Any]] = {}

    def build_all_requests(**kwargs: Any) -> None:
        key = repr(sorted(kwargs.items()))
        if key not in built:
            build(**kwargs)
            built[key] = list(task.instances)
        for instance in built[key]:
            instance.resps = []
            instance.filtered_resps = {}
        task._instances = list(built[key])

    task.build_all_requests = build_all_requests
    task._modelkin_requests_once = True
    return task


def _cache_templates() -> None:
    """lm-eval compiles a task's Jinja template for every document, on every evaluation (70% of a
    small model's evaluation): the compiled templates are kept. The same template renders the same
    text, so nothing else changes."""
    import lm_eval.utils as utils

    env = getattr(utils, "env", None)
    if env is None or getattr(utils.apply_template, "_modelkin_cached", False):
        return
    compiled = functools.lru_cache(maxsize=4096)(env.from_string)

    def apply_template(template: str, doc: dict[str, Any]) -> str:
        rendered: str = compiled(template).render(**doc)
        return rendered

    apply_template._modelkin_cached = True  # type: ignore[attr-defined]
    utils.apply_template = apply_template
