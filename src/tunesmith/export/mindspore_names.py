"""Parameter names of MindFormers' Llama-family models (Qwen1.5 / Qwen2 / Llama) and of its Qwen (v1) model,
against the Hugging Face names: the mapping of MindFormers' ``convert_weight.py`` / ``convert_reversed.py``
(``research/qwen1_5``, ``research/qwen2``, ``mindformers/models/llama``, ``research/qwen``), as one table.

==========================================  ===============================================
Hugging Face (Qwen2ForCausalLM, Llama…)     MindFormers (LlamaForCausalLM)
==========================================  ===============================================
model.embed_tokens.weight                   model.tok_embeddings.embedding_weight
model.layers.N.self_attn.q_proj.weight|bias model.layers.N.attention.wq.weight|bias
… k_proj / v_proj / o_proj                  … attention.wk / wv / wo
model.layers.N.mlp.gate_proj / down_proj /  model.layers.N.feed_forward.w1 / w2 / w3
up_proj
model.layers.N.input_layernorm.weight       model.layers.N.attention_norm.weight
model.layers.N.post_attention_layernorm     model.layers.N.ffn_norm.weight
model.norm.weight                           model.norm_out.weight
lm_head.weight                              lm_head.weight
==========================================  ===============================================

Qwen (v1, ``QWenLMHeadModel``, remote code) keeps its ``transformer.`` prefix and fuses q, k and v in one
``attn.c_attn`` tensor, which MindFormers splits into ``attention.wq/wk/wv`` (three equal row blocks).
"""

from __future__ import annotations

import re

# HF architecture (config.json "architectures") → the mapping family
ARCHITECTURES = {
    "Qwen2ForCausalLM": "llama",  # Qwen1.5 and Qwen2 (guide 002's research/qwen1_5/convert_weight.py)
    "LlamaForCausalLM": "llama",  # mindformers/models/llama/convert_weight.py
    "QWenLMHeadModel": "qwen",  # Qwen (v1): research/qwen/convert_weight.py
}

# (HF regex, MindFormers template) per family; {pre} and {n} come from the match
_LLAMA = [
    (r"model\.embed_tokens\.weight", "model.tok_embeddings.embedding_weight"),
    (r"model\.norm\.weight", "model.norm_out.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    *[
        (rf"model\.layers\.(?P<n>\d+)\.self_attn\.{hf}_proj\.(?P<kind>weight|bias)",
         f"model.layers.{{n}}.attention.w{ms}.{{kind}}")
        for hf, ms in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o"))
    ],
    *[
        (rf"model\.layers\.(?P<n>\d+)\.mlp\.{hf}_proj\.(?P<kind>weight|bias)",
         f"model.layers.{{n}}.feed_forward.{ms}.{{kind}}")
        for hf, ms in (("gate", "w1"), ("down", "w2"), ("up", "w3"))
    ],
    (r"model\.layers\.(?P<n>\d+)\.input_layernorm\.weight", "model.layers.{n}.attention_norm.weight"),
    (r"model\.layers\.(?P<n>\d+)\.post_attention_layernorm\.weight", "model.layers.{n}.ffn_norm.weight"),
]

_QWEN = [
    (r"transformer\.wte\.weight", "transformer.wte.embedding_weight"),
    (r"transformer\.ln_f\.weight", "transformer.ln_f.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"transformer\.h\.(?P<n>\d+)\.attn\.c_proj\.weight", "transformer.layers.{n}.attention.wo.weight"),
    (r"transformer\.h\.(?P<n>\d+)\.ln_1\.weight", "transformer.layers.{n}.attention_norm.weight"),
    (r"transformer\.h\.(?P<n>\d+)\.ln_2\.weight", "transformer.layers.{n}.ffn_norm.weight"),
    (r"transformer\.h\.(?P<n>\d+)\.mlp\.w1\.weight", "transformer.layers.{n}.feed_forward.w1.weight"),
    (r"transformer\.h\.(?P<n>\d+)\.mlp\.w2\.weight", "transformer.layers.{n}.feed_forward.w3.weight"),
    (r"transformer\.h\.(?P<n>\d+)\.mlp\.c_proj\.weight", "transformer.layers.{n}.feed_forward.w2.weight"),
]
# Qwen v1's fused q/k/v: one HF tensor ↔ three MindFormers tensors (split along rows, in this order)
QWEN_FUSED = re.compile(r"transformer\.h\.(?P<n>\d+)\.attn\.c_attn\.(?P<kind>weight|bias)")
QWEN_SPLIT = ("wq", "wk", "wv")
QWEN_PART = re.compile(r"transformer\.layers\.(?P<n>\d+)\.attention\.(?P<part>wq|wk|wv)\.(?P<kind>weight|bias)")

_RULES = {"llama": _LLAMA, "qwen": _QWEN}


def _compiled(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(pattern), template) for pattern, template in rules]


_FORWARD = {family: _compiled(rules) for family, rules in _RULES.items()}


def _reverse_pattern(template: str) -> re.Pattern[str]:
    """``model.layers.{n}.attention.wq.{kind}`` → a regex capturing n and kind."""
    escaped = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{kind\}", r"(?P<kind>weight|bias)")
    return re.compile(escaped)


def _hf_template(pattern: str) -> str:
    """The HF regex of a rule back to a template: ``model\\.layers\\.(?P<n>\\d+)\\.`` → ``model.layers.{n}.``."""
    text = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
    return text.replace("\\.", ".")


_BACKWARD = {
    family: [(_reverse_pattern(template), _hf_template(pattern)) for pattern, template in rules]
    for family, rules in _RULES.items()
}


def to_mindformers(family: str, name: str) -> str | None:
    """The MindFormers name of HF parameter ``name`` (None when the mapping has no such parameter)."""
    for pattern, template in _FORWARD[family]:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def to_hf(family: str, name: str) -> str | None:
    """The HF name of MindFormers parameter ``name`` (None when it is no model weight of the family)."""
    for pattern, template in _BACKWARD[family]:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


# Training state a MindFormers checkpoint may carry beside the weights (optimizer moments, loss scale, step
# counters): not model weights, skipped when converting back.
TRAINING_STATE = re.compile(
    r"(adam_[mv]|moment\d|accu_grads|global_step|learning_rate|beta[12]_power|epoch_num|step_num|loss_scale|"
    r"scale_sense|current_iterator_step|last_overflow_iterator_step)(\.|$)"
)
LORA = re.compile(r"lora_[ab]|tk_delta_lora|lora_A|lora_B", re.IGNORECASE)
