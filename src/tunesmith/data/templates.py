"""Chat templates: a declarative registry (LLaMA-Factory style) plus ``auto``, the tokenizer's own jinja.

A template renders a conversation as text pieces — one prompt (system, user turn, assistant header) and one
response (reply and end-of-turn tokens) per exchange — and segments.py turns those into ids that equal
tokenizing the whole text, i.e. ``apply_chat_template`` with the equivalent jinja (``Template.jinja()``).

Format strings use ``{{content}}``, ``{{bos_token}}`` and ``{{eos_token}}``. A template's special tokens must be
single tokens of the tokenizer (tunesmith does not add tokens), otherwise get_template fails early.
``system_in_user`` puts the formatted system text at the start of the first user turn (Llama-2, Mistral, Gemma);
``efficient_eos`` ends only the conversation's last reply with eos (GLM, Baichuan2: replies carry no end token).
LLaMA-Factory's templates for text models are ported in template_registry.py (``LF_TEMPLATES``).

qwen3: matches Qwen3's own jinja for conversations without tools, in non-thinking mode. That jinja writes an
empty ``<think>\\n\\n</think>\\n\\n`` only before the LAST assistant reply (after the last user turn) and strips
``<think>`` blocks from earlier replies. We do the same, and put the empty think block in the (untrained)
prompt, because Qwen3's non-thinking generation prompt ends with it: training and generation then see the same
prefix. A last reply that carries its own ``<think>...</think>`` is kept as thinking data and trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.segments import EncodedTurns, Rendered, encode_rendered
from tunesmith.data.template_registry import BOS, CHATML, CONTENT, EOS, LF_TEMPLATES
from tunesmith.errors import DataError

__all__ = ["BOS", "CONTENT", "EOS", "TEMPLATES", "AutoTemplate", "Template", "get_template"]
# A conversation longer than this is refused before tokenizing: a fast tokenizer holds ~200 bytes per character
# of a text it encodes (a 100 MB row: 20+ GB and many minutes), while even a 128k-token cutoff_len keeps about
# 500k characters of it. 4 Mi characters is 8 times that.
MAX_SAMPLE_CHARS = 1 << 22


def _too_long(conv: Conversation, size: int) -> DataError:
    return DataError(
        f"{conv.source or 'a conversation'}: the conversation holds {size:,} characters, more than the "
        f"{MAX_SAMPLE_CHARS:,} a sample may have (tokenizing it would take minutes and gigabytes, and cutoff_len keeps "
        "only a small part of it); split it into shorter rows, or set skip_bad_rows=true to skip such rows"
    )


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
INTERNLM2_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such "
    "as English and 中文."
)


def _split_thought(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) the way Qwen3's jinja splits a reply; reasoning is None without ``</think>``."""
    if "</think>" not in content:
        return None, content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def _messages_to_exchanges(
    messages: list[dict[str, str]], system: str | None
) -> tuple[str | None, list[str], list[str]]:
    """Validate generation messages (optional system, alternating, last is user) → (system, users, replies)."""
    if messages and messages[0].get("role") == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m.get("role") for m in messages]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if not roles or roles != expected or roles[-1] != "user":
        raise DataError(
            f"chat messages must alternate user/assistant and end with a user message, got roles "
            f"{roles}; fix the message list"
        )
    return system, [m["content"] for m in messages[0::2]], [m["content"] for m in messages[1::2]]


@dataclass(frozen=True)
class Template:
    """A declarative chat format; see the module docstring for the placeholders."""

    name: str
    format_user: str
    assistant_header: str
    format_assistant: str
    format_system: str = CONTENT
    format_prefix: str = ""
    default_system: str | None = None
    stop_words: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()
    strip_content: bool = False  # llama3's jinja trims every message
    thought_words: tuple[str, str] | None = None  # qwen3: ("<think>\n", "\n</think>\n\n")
    system_in_user: bool = False  # the formatted system text opens the first user turn (LF's Llama2Template)
    efficient_eos: bool = False  # replies have no end token; eos closes the conversation's last reply

    # -- rendering ---------------------------------------------------------------------------------------------
    def _fill(self, fmt: str, tokenizer: Any, content: str = "") -> str:
        if "{{" not in fmt.replace(CONTENT, ""):  # no bos/eos placeholder: skip HF's slow attribute lookups
            return fmt.replace(CONTENT, content)
        text = fmt.replace(BOS, tokenizer.bos_token or "").replace(EOS, tokenizer.eos_token or "")
        return text.replace(CONTENT, content)  # last: content may itself contain "{{eos_token}}"

    def _render(self, tokenizer: Any, system: str | None, users: list[str], replies: list[str]) -> Rendered:
        """Pieces for len(users) exchanges; with one reply fewer, the last prompt ends with the generation header."""
        clean = str.strip if self.strip_content else str
        system = system if system is not None else self.default_system
        head = self._fill(self.format_prefix, tokenizer)
        system_text = "" if system is None else self._fill(self.format_system, tokenizer, clean(system))
        if not self.system_in_user:  # else it opens the first user turn, and a dropped first exchange drops it
            head, system_text = head + system_text, ""
        user_tail = self._fill(self.format_user.split(CONTENT, 1)[1], tokenizer)
        header = self._fill(self.assistant_header, tokenizer)
        prompts, responses, tails = [], [], []
        for i, user in enumerate(users):
            last = i == len(users) - 1
            content = system_text + clean(user) if i == 0 else clean(user)
            prompt = (head if i == 0 else "") + self._fill(self.format_user, tokenizer, content) + header
            tail = len(user_tail) + len(header)
            reply = replies[i] if i < len(replies) else None
            if self.thought_words is not None:
                prompt, tail, reply = self._thought(prompt, tail, reply, last)
            prompts.append(prompt)
            tails.append(tail)
            if reply is not None:
                end = (tokenizer.eos_token or "") if self.efficient_eos and last else ""
                responses.append(self._fill(self.format_assistant, tokenizer, clean(reply)) + end)
        return Rendered(prompts, responses, len(head), tails)

    def _thought(self, prompt: str, tail: int, reply: str | None, last: bool) -> tuple[str, int, str | None]:
        """Qwen3's think-block rules (module docstring)."""
        open_, close = self.thought_words  # type: ignore[misc]
        reasoning, answer = _split_thought(reply) if reply is not None else (None, "")
        if not last:
            return prompt, tail, answer
        if reasoning is None:  # no thinking data: empty block in the prompt, as non-thinking generation does
            empty = open_ + close
            return prompt + empty, tail + len(empty), None if reply is None else answer.lstrip("\n")
        return prompt, tail, open_ + reasoning.strip("\n") + close + answer

    def render(self, tokenizer: Any, conv: Conversation, default_system: str | None = None) -> Rendered:
        system = conv.system if conv.system is not None else default_system
        exchanges = conv.exchanges()
        return self._render(tokenizer, system, [u for u, _ in exchanges], [a for _, a in exchanges])

    # -- the contract ------------------------------------------------------------------------------------------
    def encode_many(
        self, tokenizer: Any, convs: list[Conversation], default_system: str | None = None
    ) -> list[EncodedTurns | DataError]:
        """encode_turns for many conversations in one tokenizer batch; a conversation that cannot be rendered
        gives its DataError in place (encode_dataset decides whether to skip it)."""
        rendered: list[Rendered] = []
        slots: list[int | DataError] = []
        for conv in convs:
            size = sum(len(turn.content) for turn in conv.turns) + len(conv.system or "")
            if size > MAX_SAMPLE_CHARS:
                slots.append(_too_long(conv, size))
                continue
            try:
                rendered.append(self.render(tokenizer, conv, default_system))
                slots.append(len(rendered) - 1)
            except DataError as err:
                slots.append(err)
        encoded = encode_rendered(tokenizer, rendered)
        return [encoded[s] if isinstance(s, int) else s for s in slots]

    def encode_turns(
        self, tokenizer: Any, conv: Conversation, default_system: str | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """One (prompt_ids, response_ids) per exchange; joined they equal the whole rendered text's ids."""
        result = self.encode_many(tokenizer, [conv], default_system)[0]
        if isinstance(result, DataError):
            raise result
        return result.pairs

    def prompt_text(self, tokenizer: Any, messages: list[dict[str, str]], system: str | None = None) -> str:
        system, users, replies = _messages_to_exchanges(messages, system)
        return "".join(self._render(tokenizer, system, users, replies).prompt_pieces())

    def encode_prompt(
        self, tokenizer: Any, messages: list[dict[str, str]], system: str | None = None
    ) -> list[int]:
        """Ids for generation: the messages (last one from the user) and the assistant header."""
        return tokenizer(self.prompt_text(tokenizer, messages, system), add_special_tokens=False)["input_ids"]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        ids = [_single_token_id(tokenizer, word) for word in self.stop_words]
        ids.append(tokenizer.eos_token_id)
        return list(dict.fromkeys(i for i in ids if i is not None))

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Fail early when the tokenizer lacks a token this template writes."""
        needed = list(self.special_tokens)
        writes_eos = self.efficient_eos or EOS in self.format_assistant + self.format_user + self.format_system
        if writes_eos and not tokenizer.eos_token:
            needed.append("an eos_token")
        for token in needed:
            if token.startswith("an ") or _single_token_id(tokenizer, token) is None:
                raise DataError(
                    f"template {self.name} needs the token {token}, which tokenizer "
                    f"{getattr(tokenizer, 'name_or_path', '')!r} does not have as one token; set template=auto "
                    f"(the model's own chat template) or the template made for this model"
                )

    def jinja(self) -> str:
        """An HF chat_template equivalent to this template (for export and for tests)."""
        return _declarative_jinja(self)


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _jinja_expr(fmt: str, content: str | None = None) -> str:
    """A format string as a jinja expression: literals joined with the token / content variables."""
    parts: list[str] = []
    literal = ""
    i = 0
    names = {BOS: "bos_token", EOS: "eos_token", CONTENT: content}
    while i < len(fmt):
        hit = next((k for k in names if fmt.startswith(k, i)), None)
        if hit is None:
            literal += fmt[i]
            i += 1
            continue
        if literal:
            parts.append(json.dumps(literal, ensure_ascii=False))
            literal = ""
        parts.append(f"({names[hit]} or '')" if hit != CONTENT else str(names[hit]))
        i += len(hit)
    if literal:
        parts.append(json.dumps(literal, ensure_ascii=False))
    return " + ".join(parts) or "''"


def _declarative_jinja(t: Template) -> str:
    trim = " | trim" if t.strip_content else ""
    default = json.dumps(t.default_system, ensure_ascii=False) if t.default_system is not None else "none"
    header = _jinja_expr(t.assistant_header)
    system = _jinja_expr(t.format_system, "(system_message" + trim + ")")
    lines = [
        "{%- if messages and messages[0]['role'] == 'system' %}",
        "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}",
        f"{{%- else %}}{{%- set system_message = {default} %}}{{%- set loop_messages = messages %}}{{%- endif %}}",
        f"{{{{- {_jinja_expr(t.format_prefix)} }}}}",
        "" if t.system_in_user else f"{{%- if system_message is not none %}}{{{{- {system} }}}}{{%- endif %}}",
        "{%- for message in loop_messages %}",
        "{%- if message['role'] == 'user' %}",
        f"{{%- set content = message.content{trim} %}}",
        f"{{%- if loop.first and system_message is not none %}}{{%- set content = {system} + content %}}{{%- endif %}}"
        if t.system_in_user
        else "",
        f"{{{{- {_jinja_expr(t.format_user, 'content')} }}}}",
        "{%- elif message['role'] == 'assistant' %}",
        *_assistant_jinja(t, header, trim),
        "{%- if loop.last %}{{- (eos_token or '') }}{%- endif %}" if t.efficient_eos else "",
        "{%- else %}{{- raise_exception('only system, user and assistant messages are supported') }}",
        "{%- endif %}",
        "{%- endfor %}",
        f"{{%- if add_generation_prompt %}}{{{{- {header} }}}}",
    ]
    if t.thought_words is not None:
        open_, close = (json.dumps(w) for w in t.thought_words)
        lines.append(
            f"{{%- if enable_thinking is not defined or not enable_thinking %}}{{{{- {open_} + {close} }}}}"
            "{%- endif %}"
        )
    lines.append("{%- endif %}")
    return "\n".join(line for line in lines if line)


def _assistant_jinja(t: Template, header: str, trim: str) -> list[str]:
    """The jinja of one assistant message (with thought_words: qwen3's think-block rules)."""
    reply = _jinja_expr(t.format_assistant, "(content" + trim + ")")
    if t.thought_words is None:
        return ["{%- set content = message.content %}", f"{{{{- {header} + {reply} }}}}"]
    open_, close = (json.dumps(w) for w in t.thought_words)
    empty_reply = _jinja_expr(t.format_assistant, "content.lstrip('\\n')")
    think_reply = _jinja_expr(t.format_assistant, f"{open_} + reasoning.strip('\\n') + {close} + content")
    return [
        "{%- set content = message.content %}{%- set reasoning = none %}",
        "{%- if '</think>' in content %}",
        "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}",
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}",
        "{%- endif %}",
        "{%- if loop.last and reasoning is none %}",
        f"{{{{- {header} + {open_} + {close} + {empty_reply} }}}}",
        "{%- elif loop.last %}",
        f"{{{{- {header} + {think_reply} }}}}",
        "{%- else %}",
        f"{{{{- {header} + {reply} }}}}",
        "{%- endif %}",
    ]


@dataclass(frozen=True)
class AutoTemplate(Template):
    """``auto``: the tokenizer's own jinja. Each exchange's prompt / reply text is found by rendering growing
    prefixes of the conversation and taking the differences, so the template must be prefix-stable: rendering
    more messages may only append text (Qwen3's own template is not, for multi-turn: it rewrites earlier
    replies)."""

    chat_template: str = ""

    def _apply(self, tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=generation
        )

    def render(self, tokenizer: Any, conv: Conversation, default_system: str | None = None) -> Rendered:
        from jinja2 import TemplateError

        try:
            return self._render_auto(tokenizer, conv, default_system)
        except TemplateError as err:  # the template's own raise_exception(...) or an undefined variable
            raise DataError(
                f"{conv.source}: the tokenizer's chat template (template=auto) refused this conversation ({err}); "
                "fix the row, set skip_bad_rows=true to skip such rows, or set template to a named one such as chatml"
            ) from None

    def _render_auto(self, tokenizer: Any, conv: Conversation, default_system: str | None) -> Rendered:
        messages = conv.to_messages(default_system)
        first = len(messages) - len(conv.turns)  # 1 with a system message
        prompts, responses, tails = [], [], []
        done = ""
        for k, (user, _) in enumerate(conv.exchanges()):
            upto = first + 2 * k
            prompt_full = self._apply(tokenizer, messages[: upto + 1], generation=True)
            reply_full = self._apply(tokenizer, messages[: upto + 2], generation=False)
            if not prompt_full.startswith(done) or not reply_full.startswith(prompt_full):
                raise DataError(
                    f"{conv.source}: the tokenizer's chat template (template=auto) is not prefix-stable at "
                    f"exchange {k + 1}: rendering more messages changes the text of earlier ones (Qwen3's template "
                    f"rewrites earlier replies, for example); set template to a named one such as qwen3"
                )
            prompt, reply = prompt_full[len(done) :], reply_full[len(prompt_full) :]
            if not reply.strip():
                raise DataError(
                    f"{conv.source}: the tokenizer's chat template renders no text for assistant replies "
                    "so there is nothing to train on; set template to a named one such as chatml"
                )
            at = prompt.rfind(user) if user else -1
            tails.append(len(prompt) - at - len(user) if at >= 0 else 0)
            prompts.append(prompt)
            responses.append(reply)
            done = reply_full
        return Rendered(prompts, responses, 0, tails)

    def prompt_text(self, tokenizer: Any, messages: list[dict[str, str]], system: str | None = None) -> str:
        system, users, replies = _messages_to_exchanges(messages, system)
        chat = [{"role": "system", "content": system}] if system is not None else []
        for i, user in enumerate(users):
            chat.append({"role": "user", "content": user})
            chat += [{"role": "assistant", "content": reply} for reply in replies[i : i + 1]]
        return self._apply(tokenizer, chat, generation=True)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """eos and the special tokens the template writes after a reply (such as <|im_end|> or <|eot_id|>)."""
        probe = Conversation([Turn("user", "hi"), Turn("assistant", "hello")], source="stop-token probe")
        reply = self.render(tokenizer, probe).responses[0]
        after = reply[reply.rfind("hello") + len("hello") :]
        added = getattr(tokenizer, "added_tokens_decoder", {})
        special = set(tokenizer.all_special_ids) | {
            i for i, tok in added.items() if getattr(tok, "special", False)
        }
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        return list(dict.fromkeys(i for i in [*ids, tokenizer.eos_token_id] if i in special))

    def check_tokenizer(self, tokenizer: Any) -> None:
        pass

    def jinja(self) -> str:
        return self.chat_template


TEMPLATES: dict[str, Template] = {
    "chatml": Template("chatml", **CHATML),
    "qwen": Template("qwen", **CHATML, default_system=QWEN_SYSTEM),
    "qwen3": Template("qwen3", **CHATML, thought_words=("<think>\n", "\n</think>\n\n")),
    # LLaMA-Factory's name for Qwen3 instruct models without thinking (Qwen3-*-Instruct-2507): plain ChatML
    "qwen3_nothink": Template("qwen3_nothink", **CHATML),
    # llama3 trims every message as Meta's jinja does; LLaMA-Factory's llama3 keeps surrounding whitespace
    "llama3": Template(
        "llama3",
        format_prefix=BOS,
        format_system="<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
        format_user="<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        format_assistant="{{content}}<|eot_id|>",
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        strip_content=True,
    ),
    "internlm2": Template(
        "internlm2",
        **{**CHATML, "format_prefix": BOS},
        default_system=INTERNLM2_SYSTEM,
    ),
    # For models without a chat format of their own. The header ends with a newline so the reply starts a new
    # BPE word: "Assistant:" + "Hi" would merge into ":Hi" and blur the prompt/reply boundary.
    "default": Template(
        "default",
        format_system="System: {{content}}{{eos_token}}\n",
        format_user="Human: {{content}}{{eos_token}}\n",
        assistant_header="Assistant:\n",
        format_assistant="{{content}}{{eos_token}}\n",
    ),
}

TEMPLATES.update({name: Template(name, **spec) for name, spec in LF_TEMPLATES.items()})
# LLaMA-Factory calls the InternLM2 / 2.5 / 3 format intern2 (its short-lived intern3 was merged into it)
TEMPLATES["intern2"] = replace(TEMPLATES["internlm2"], name="intern2")
TEMPLATES["internlm3"] = replace(TEMPLATES["internlm2"], name="internlm3")


def _check_jinja(tokenizer: Any, chat_template: str) -> None:
    """A chat template that is not valid jinja (a damaged chat_template.jinja) fails once, here, in one sentence."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
    except TemplateSyntaxError as err:
        raise DataError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '')!r} is not valid jinja (line {err.lineno}: "
            f"{err.message}); restore its chat_template.jinja (or tokenizer_config.json), or set template to one of "
            f"{', '.join(TEMPLATES)}"
        ) from None
    except TemplateError:  # valid jinja that refuses this probe (its own raise_exception): rows are checked later
        return


def get_template(name: str, tokenizer: Any) -> Template:
    """A registered template checked against the tokenizer, or ``auto``: the tokenizer's own chat template."""
    if name == "auto":
        chat_template = getattr(tokenizer, "chat_template", None)
        if isinstance(chat_template, dict):  # tokenizers with several named templates
            chat_template = chat_template.get("default")
        if not chat_template:
            raise DataError(
                f"template=auto needs the tokenizer's chat template, but {getattr(tokenizer, 'name_or_path', '')!r} "
                f"has none; set template to one of {', '.join(TEMPLATES)}"
            )
        _check_jinja(tokenizer, chat_template)
        return AutoTemplate("auto", "", "", "", chat_template=chat_template)
    if name not in TEMPLATES:
        raise DataError(f"unknown template {name!r}; set template to auto or one of {', '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    template.check_tokenizer(tokenizer)
    return template
