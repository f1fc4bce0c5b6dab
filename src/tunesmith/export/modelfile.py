"""An Ollama ``Modelfile`` beside an exported .gguf: FROM, TEMPLATE (Go template syntax), stop tokens, SYSTEM.

The TEMPLATE is built from a registry chat template (templates.py) piece by piece, the way ``Template._render``
joins them: a user turn is ``format_user`` + ``assistant_header`` (so a conversation ending with the user ends
with the generation header), an assistant turn is ``format_assistant``. Ollama passes SYSTEM as a system message
of ``.Messages`` when the request has none, which is how our templates use ``default_system``.
For ``template: auto`` (the tokenizer's own jinja) no TEMPLATE is written: Ollama reads the GGUF's
``tokenizer.chat_template`` and matches it against the templates it knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.data.template_registry import BOS, CONTENT, EOS

_CONTENT_GO = "{{ .Content }}"


def _go(fmt: str, tokenizer: Any, content: str = _CONTENT_GO) -> str:
    """A registry format string as Go template text: the content slot becomes ``.Content``, bos/eos their text."""
    text = fmt.replace(BOS, tokenizer.bos_token or "").replace(EOS, tokenizer.eos_token or "")
    return text.replace(CONTENT, content)


def go_template(template: Any, tokenizer: Any) -> str:
    """Ollama's TEMPLATE for a registry Template (one that has format_user / assistant_header)."""
    header = _go(template.assistant_header, tokenizer)
    if template.thought_words is not None:  # qwen3 non-thinking: an empty think block after the last header
        empty = "".join(template.thought_words)
        header += f"{{{{ if $last }}}}{empty}{{{{ end }}}}"
    system = _go(template.format_system, tokenizer, "{{ $system }}")
    lines = [
        '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}'
        "{{ end }}",
        _go(template.format_prefix, tokenizer),
    ]
    if template.system_in_user:  # the formatted system text opens the first user turn
        user = _go(template.format_user, tokenizer, f"{{{{ if and $first $system }}}}{system}{{{{ end }}}}{_CONTENT_GO}")
    else:
        lines.append(f"{{{{ if $system }}}}{system}{{{{ end }}}}")
        user = _go(template.format_user, tokenizer)
    lines += [
        "{{ $first := true }}",
        "{{ range $i, $_ := .Messages }}",
        "{{ $last := eq (len (slice $.Messages $i)) 1 }}",
        f'{{{{ if eq .Role "user" }}}}{user}{header}{{{{ $first = false }}}}',
        f'{{{{ else if eq .Role "assistant" }}}}{_go(template.format_assistant, tokenizer)}',
        "{{ end }}",
        "{{ end }}",
    ]
    return "".join(line for line in lines if line)


def stop_words(template: Any, tokenizer: Any) -> list[str]:
    words = list(getattr(template, "stop_words", ()) or ())
    if tokenizer.eos_token:
        words.append(tokenizer.eos_token)
    return list(dict.fromkeys(words))


def _quoted(text: str) -> str:
    """A Modelfile value: triple-quoted when it spans lines (Ollama's syntax), else a JSON-style string."""
    if '"""' not in text and ("\n" in text or '"' in text):
        return f'"""{text}"""'
    return json.dumps(text, ensure_ascii=False)


def write_modelfile(path: Path, gguf_name: str, template: Any, tokenizer: Any, system: str | None) -> Path:
    """The Modelfile for ``ollama create NAME -f path``; `template` is a registry Template or None (auto)."""
    lines = [f"FROM ./{gguf_name}", ""]
    if template is not None and hasattr(template, "format_user") and type(template).__name__ == "Template":
        lines.append(f'TEMPLATE """{go_template(template, tokenizer)}"""')
        stops = stop_words(template, tokenizer)
        if system is None:
            system = template.default_system
    else:
        lines.append("# TEMPLATE: none written; Ollama uses the chat template stored in the GGUF file")
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    lines += [f"PARAMETER stop {_quoted(word)}" for word in stops]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
