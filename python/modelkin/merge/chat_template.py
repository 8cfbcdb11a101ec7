"""The recipe's ``chat_template``: a named format, ``auto`` (the template most of the models share),
or a literal Jinja template, written to the output's tokenizer as mergekit writes it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .recipe import RecipeError

# The conversation formats mergekit knows by name, written here in their common published form.
NAMED: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant after an optional system message') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{%- if loop.first and system_message is defined %}"
        "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('Only user and assistant roles follow the system message') }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (system | last).content | trim if system else '' }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}\n\n### Instruction:\n{{ message['content'] | trim }}"
        "{% elif message['role'] == 'user_context' %}\n\n### Input:\n{{ message['content'] | trim }}"
        "{% elif message['role'] == 'assistant' %}\n\n### Response:\n{{ message['content'] | trim }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n\n### Response:\n{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def model_template(directory: Path) -> str | None:
    """A model's chat template: chat_template.jinja, else tokenizer_config.json's (its default one
    when it holds several)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template: Any = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = (t for t in template if isinstance(t, dict) and t.get("name") == "default")
        template = next((t.get("template") for t in named), None)
    return template if isinstance(template, str) and template else None


def resolve_template(value: str, model_dirs: Iterable[Path]) -> str | None:
    """The template text a recipe's ``chat_template`` asks for (None: ``auto`` found none)."""
    if value == "auto":
        found = [t.strip() for d in model_dirs if (t := model_template(d))]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED:
        return NAMED[value]
    if len(value) < 20 or "{" not in value:
        raise RecipeError(
            f"chat_template: {value!r} is neither a known name ({', '.join(sorted(NAMED))}, auto) nor a Jinja template"
        )
    return value


def write_template(staging: Path, template: str) -> None:
    """Writes the template as transformers saves one: chat_template.jinja, and the same text in
    tokenizer_config.json so that older readers agree; a stale chat_template.json is dropped."""
    if not (staging / "tokenizer_config.json").exists() and not (staging / "tokenizer.json").exists():
        raise RecipeError("chat_template: the output has no tokenizer to carry it (its source has no tokenizer files)")
    (staging / "chat_template.jinja").write_text(template, encoding="utf-8")
    (staging / "chat_template.json").unlink(missing_ok=True)
    config_path = staging / "tokenizer_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
