"""LLaMA-Factory's chat templates for text models, as plain data; templates.py makes each a ``Template``.

The formats follow LLaMA-Factory's ``src/llamafactory/data/template.py`` (read for facts, written here in our
own form), so a config with ``template: NAME`` renders the text LLaMA-Factory renders. How LLaMA-Factory's
template features map onto ours:

- ``{"bos_token"}`` / ``{"eos_token"}`` slots: the ``{{bos_token}}`` / ``{{eos_token}}`` placeholders (empty
  when the tokenizer has none, as in LLaMA-Factory); ``{"token": X}`` slots: the text X, listed in
  ``special_tokens`` so that a tokenizer without X as one token fails early instead of splitting it.
- LLaMA-Factory's user slot ends with the assistant header; ours keeps the header apart (``assistant_header``)
  where the family has one, so a generation prompt ends exactly there.
- An assistant slot left to LLaMA-Factory's default is ``{{content}}{{eos_token}}`` (``{{content}}`` with
  efficient_eos).
- ``Llama2Template`` (the system text opens the first user turn): ``system_in_user``.
- ``efficient_eos`` (replies carry no end token; LLaMA-Factory appends one eos after the whole conversation and
  also labels the token after each earlier reply with eos): the last reply ends with ``{{eos_token}}``; the
  label-only part has no counterpart in our (prompt, reply) pairs, so earlier replies train without an end,
  and when cutoff_len drops the later exchanges the kept last reply has no eos (LLaMA-Factory appends it after
  truncating).
- ``replace_eos`` (the tokenizer's eos becomes the first stop word): the stop words are stop tokens already,
  and none of these formats writes ``{{eos_token}}`` where a stop word would replace it, so nothing changes.
- ``ReasoningTemplate`` (deepseekr1): ``thought_words``, with the behaviour templates.py describes for qwen3.
- Tools, observations and multimodal plugins are not ported (tunesmith trains text conversations).

LLaMA-Factory tokenizes each slot on its own, tunesmith the whole rendered text: with byte-level BPE
tokenizers the ids are the same; with SentencePiece tokenizers that prefix a word boundary to every encoded
piece (Llama-2, Mistral v0.1-0.3, Vicuna, Baichuan2, ChatGLM3) LLaMA-Factory's ids can carry that marker at
the start of each slot, which rendering the text cannot express (not checked: no such tokenizer is offline).
"""

from __future__ import annotations

from typing import Any

CONTENT, BOS, EOS = "{{content}}", "{{bos_token}}", "{{eos_token}}"

CHATML: dict[str, Any] = {
    "format_user": "<|im_start|>user\n{{content}}<|im_end|>\n",
    "assistant_header": "<|im_start|>assistant\n",
    "format_assistant": "{{content}}<|im_end|>\n",
    "format_system": "<|im_start|>system\n{{content}}<|im_end|>\n",
    "stop_words": ("<|im_end|>",),
    "special_tokens": ("<|im_start|>", "<|im_end|>"),
}

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
THINK_WORDS = ("<think>\n", "\n</think>\n\n")

_GEMMA: dict[str, Any] = {  # gemma and gemma3 (LLaMA-Factory's gemma3 adds only an image plugin)
    "format_prefix": BOS,
    "format_system": "{{content}}\n\n",
    "system_in_user": True,
    "format_user": "<start_of_turn>user\n{{content}}<end_of_turn>\n",
    "assistant_header": "<start_of_turn>model\n",
    "format_assistant": "{{content}}<end_of_turn>\n",
    "stop_words": ("<end_of_turn>",),
    "special_tokens": ("<start_of_turn>", "<end_of_turn>"),
}

# chatglm3 and glm4: no end token after a reply, the next turn's tag stops generation
_GLM: dict[str, Any] = {
    "format_system": "<|system|>\n{{content}}",
    "format_user": "<|user|>\n{{content}}",
    "assistant_header": "<|assistant|>",
    "format_assistant": "\n{{content}}",
    "efficient_eos": True,
    "stop_words": ("<|user|>", "<|observation|>"),
}

_DEEPSEEK: dict[str, Any] = {  # deepseek3 and deepseekr1 (V2.5 / V3 / R1 and the R1 distills)
    "format_prefix": BOS,
    "format_user": "<｜User｜>{{content}}",
    "assistant_header": "<｜Assistant｜>",
    "format_assistant": "{{content}}{{eos_token}}",
    "special_tokens": ("<｜User｜>", "<｜Assistant｜>"),
}

# name -> Template keyword arguments (format_system defaults to "{{content}}": the system text as it is)
LF_TEMPLATES: dict[str, dict[str, Any]] = {
    "empty": {"format_user": CONTENT, "assistant_header": "", "format_assistant": CONTENT},
    "alpaca": {
        "default_system": ALPACA_SYSTEM,
        "format_user": "### Instruction:\n{{content}}\n\n",
        "assistant_header": "### Response:\n",
        "format_assistant": "{{content}}{{eos_token}}\n\n",
    },
    "vicuna": {
        "default_system": VICUNA_SYSTEM,
        "format_user": "USER: {{content}}",
        "assistant_header": " ASSISTANT:",
        "format_assistant": "{{content}}{{eos_token}}",
    },
    "llama2": {
        "format_system": "<<SYS>>\n{{content}}\n<</SYS>>\n\n",
        "system_in_user": True,
        "format_user": "{{bos_token}}[INST] {{content}} [/INST]",
        "assistant_header": "",
        "format_assistant": "{{content}}{{eos_token}}",
    },
    "mistral": {
        "format_prefix": BOS,
        "format_system": "{{content}}\n\n",
        "system_in_user": True,
        "format_user": "[INST] {{content}}[/INST]",
        "assistant_header": "",
        "format_assistant": " {{content}}{{eos_token}}",
    },
    "llama4": {
        "format_prefix": BOS,
        "format_system": "<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>",
        "format_user": "<|header_start|>user<|header_end|>\n\n{{content}}<|eot|>",
        "assistant_header": "<|header_start|>assistant<|header_end|>\n\n",
        "format_assistant": "{{content}}<|eot|>",
        "stop_words": ("<|eot|>", "<|eom|>"),
        "special_tokens": ("<|header_start|>", "<|header_end|>", "<|eot|>"),
    },
    "gemma": _GEMMA,
    "gemma3": _GEMMA,
    "glm4": {
        **_GLM,
        "format_prefix": "[gMASK]<sop>",
        "special_tokens": ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"),
    },
    "chatglm3": {
        **_GLM,
        "format_prefix": "[gMASK]sop",
        "special_tokens": ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>"),
    },
    "deepseek3": _DEEPSEEK,
    "deepseekr1": {**_DEEPSEEK, "thought_words": THINK_WORDS},
    "phi": {
        "format_system": "<|system|>\n{{content}}<|end|>\n",
        "format_user": "<|user|>\n{{content}}<|end|>\n",
        "assistant_header": "<|assistant|>\n",
        "format_assistant": "{{content}}<|end|>\n",
        "stop_words": ("<|end|>",),
        "special_tokens": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    },
    "phi4": {
        "format_system": "<|im_start|>system<|im_sep|>{{content}}<|im_end|>",
        "format_user": "<|im_start|>user<|im_sep|>{{content}}<|im_end|>",
        "assistant_header": "<|im_start|>assistant<|im_sep|>",
        "format_assistant": "{{content}}<|im_end|>",
        "stop_words": ("<|im_end|>",),
        "special_tokens": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    },
    "yi": CHATML,
    # LLaMA-Factory removed baichuan2 in January 2026 (commit 5cccaeec "clean obsolete models"); as it was before.
    "baichuan2": {
        "format_user": "<reserved_106>{{content}}",
        "assistant_header": "<reserved_107>",
        "format_assistant": CONTENT,
        "efficient_eos": True,
        "special_tokens": ("<reserved_106>", "<reserved_107>"),
    },
}
