"""Checks that need the peer tools (transformers, torch), run by another Python: the one beside
mergekit-yaml when MODELKIN_MERGEKIT names it, since mergekit brings transformers along."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

_LOAD = """
import json, sys
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
path = Path(sys.argv[1])
model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
problems = {k: [str(x) for x in v] for k, v in info.items() if v}
config = AutoConfig.from_pretrained(path)
tokens = None
template = None
if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = len(tokenizer)
    template = tokenizer.chat_template
rows = model.get_input_embeddings().weight.shape[0]
print(json.dumps({"problems": problems, "tokens": tokens, "rows": rows, "vocab_size": config.vocab_size,
                  "template": template}))
"""


def peer_python(mergekit: str | None) -> Path | None:
    """The Python of mergekit's venv, if mergekit is named and that Python exists."""
    if mergekit is None:
        return None
    python = Path(mergekit).parent / "python"
    return python if python.exists() else None


def load_in_transformers(python: Path, model: Path) -> dict:
    """Loads ``model`` with transformers' Auto classes and returns what it found: the loading
    problems (missing, unexpected, mismatched keys), the tokenizer's size, the embedding rows, the
    config's vocab_size and the chat template."""
    done = subprocess.run([str(python), "-c", _LOAD, str(model)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_loads(python: Path, model: Path) -> dict:
    """transformers loads the model with no missing, unexpected or mismatched keys, and its
    tokenizer fits the embedding rows the config states."""
    found = load_in_transformers(python, model)
    assert not found["problems"], found["problems"]
    assert found["rows"] == found["vocab_size"], found
    if found["tokens"] is not None:
        assert found["tokens"] <= found["rows"], found
    return found
