"""Architecture facts of a decoder-only LM, read from its ``config.json`` alone, and the parameter counts that
follow from them (no weights are loaded: a 20B model is planned in milliseconds).

``arch_for(cfg)`` finds the facts for a tunesmith config: a local model folder's ``config.json``, else the
built-in table ``resources/plan/architectures.json`` (the seed models, matched case-insensitively by the full hub
id, its last path component, or an alias such as ``smollm2-135m-instruct``). Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

# Linear layers of one decoder layer, by family: (name, in_features, out_features) are filled in by
# ArchFacts.linears(); the names are what lora_target lists match.
_LLAMA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchFacts:
    """What the memory model needs to know about a model (all from config.json)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # the MLP width (Qwen-1's config.json stores twice this)
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    source: str = ""  # where the facts came from, for the report
    checkpoint_bytes: int = 2  # bytes per weight in the saved checkpoint (config.json's dtype / torch_dtype)
    # A pipeline stage's share (:func:`shard_view`): the first stage holds the embedding, the last the final norm
    # and the output head (its own copy when the embeddings are tied). A whole model holds both.
    holds_embedding: bool = True
    holds_head: bool = True

    # ---------------------------------------------------------------------------------------- shapes

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of every Linear in one decoder layer."""
        h, kv, i = self.hidden_size, self.num_kv_heads * self.head_dim, self.intermediate_size
        q = self.num_heads * self.head_dim
        if self.model_type == "qwen":  # Qwen-1: fused c_attn (q, k, v), w1/w2 (up, gate), mlp.c_proj (down)
            return [("c_attn", h, q + 2 * kv), ("attn.c_proj", q, h), ("w1", h, i), ("w2", h, i),
                    ("mlp.c_proj", i, h)]
        if self.model_type == "internlm2":  # fused wqkv, wo, w1 (gate), w3 (up), w2 (down)
            return [("wqkv", h, q + 2 * kv), ("wo", q, h), ("w1", h, i), ("w3", h, i), ("w2", i, h)]
        return [(_LLAMA_NAMES[0], h, q), (_LLAMA_NAMES[1], h, kv), (_LLAMA_NAMES[2], h, kv),
                (_LLAMA_NAMES[3], q, h), (_LLAMA_NAMES[4], h, i), (_LLAMA_NAMES[5], h, i),
                (_LLAMA_NAMES[6], i, h)]

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        """Weights of a decoder layer's Linear layers (what QLoRA quantizes)."""
        return sum(n_in * n_out for _, n_in, n_out in self.linears())

    @property
    def layer_params(self) -> int:
        """One decoder layer: linears, q/k/v biases where the family has them, two RMSNorm weights."""
        bias = self.num_heads * self.head_dim + 2 * self.kv_size if self.qkv_bias else 0
        return self.layer_linear_params + bias + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size if self.holds_embedding else 0

    @property
    def lm_head_params(self) -> int:
        if not self.holds_head or (self.tied_embeddings and self.holds_embedding):
            return 0
        return self.vocab_size * self.hidden_size

    @property
    def head_weight_params(self) -> int:
        """The output head's weight as the forward uses it (tied or not); 0 on a stage without the head."""
        return self.vocab_size * self.hidden_size if self.holds_head else 0

    @property
    def total_params(self) -> int:
        """All parameters, tied embeddings counted once (as ``model.num_parameters()`` does)."""
        norm = self.hidden_size if self.holds_head else 0
        return self.num_layers * self.layer_params + self.embedding_params + self.lm_head_params + norm

    @property
    def quantizable_params(self) -> int:
        """Parameters bitsandbytes quantizes: the decoder layers' Linear weights (not embeddings, the output
        head, norms or biases)."""
        return self.num_layers * self.layer_linear_params

    @property
    def largest_module_params(self) -> int:
        """Parameters of the largest single module (DeepSpeed's ``largest_layer_params``): for LMs the
        embedding (or the untied output head)."""
        return max([self.embedding_params, *(n_in * n_out for _, n_in, n_out in self.linears())])

    def lora_params(self, rank: int, targets: list[str] | str = "all") -> int:
        """Trainable LoRA parameters: r × (in + out) for each targeted Linear of every layer. Targets that
        match no Linear of this family fall back to all of them (PEFT would refuse; the plan stays useful)."""
        chosen = [(n_in, n_out) for name, n_in, n_out in self.linears() if _targeted(name, targets)]
        if not chosen:
            chosen = [(n_in, n_out) for _, n_in, n_out in self.linears()]
        return self.num_layers * sum(rank * (n_in + n_out) for n_in, n_out in chosen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tied_embeddings": self.tied_embeddings,
            "total_params": self.total_params,
            "source": self.source,
        }


def _split(value: int, parts: int) -> int:
    return -(-value // parts)  # a rank holds the larger share when the split is uneven


def shard_view(arch: ArchFacts, tp: int = 1, pp: int = 1, stage: int = 0) -> ArchFacts:
    """What one rank of a tensor-parallel group of ``tp`` in pipeline stage ``stage`` of ``pp`` holds, as the
    facts of a smaller model: Megatron's column/row plans split the query and key/value heads and the MLP width,
    the vocabulary-parallel embedding and head split the vocabulary, the norms stay whole; a stage holds its
    consecutive share of the layers (the first stage the larger share), the first the embedding, the last the
    final norm and the head."""
    if tp == 1 and pp == 1:
        return arch
    layers = arch.num_layers // pp + (1 if stage < arch.num_layers % pp else 0)
    return replace(
        arch,
        num_heads=_split(arch.num_heads, tp),
        num_kv_heads=_split(arch.num_kv_heads, tp),
        intermediate_size=_split(arch.intermediate_size, tp),
        vocab_size=_split(arch.vocab_size, tp),
        num_layers=max(layers, 1),
        holds_embedding=arch.holds_embedding and stage == 0,
        holds_head=arch.holds_head and stage == pp - 1,
    )


def _targeted(name: str, targets: list[str] | str) -> bool:
    if targets == "all" or targets == ["all"]:
        return True
    wanted = [targets] if isinstance(targets, str) else targets
    return any(name == t or name.endswith(f".{t}") or name.split(".")[-1] == t for t in wanted)


def facts_from_config(config: dict[str, Any], source: str = "") -> ArchFacts | None:
    """ArchFacts from a config.json mapping; None when it lacks what a decoder-only LM needs (an encoder, a
    multimodal wrapper without a text config, an unknown layout)."""
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    model_type = str(config.get("model_type") or "").lower()
    try:
        hidden = int(config["hidden_size"])
        layers = int(config.get("num_hidden_layers") or config["num_layers"])
        heads = int(config["num_attention_heads"])
        vocab = int(config.get("vocab_size") or config["padded_vocab_size"])
        inter = int(config.get("intermediate_size") or config.get("ffn_hidden_size") or 4 * hidden)
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(config.get("num_key_value_heads") or config.get("multi_query_group_num") or heads)
    head_dim = int(config.get("head_dim") or config.get("kv_channels") or hidden // heads)
    if model_type == "qwen":
        inter //= 2  # Qwen-1's config.json gives 2 × the MLP width (its w1 and w2 are each intermediate_size/2)
    if model_type in ("qwen", "qwen2"):
        qkv_bias = True
    elif model_type == "internlm2":
        qkv_bias = bool(config.get("bias", False))
    else:
        qkv_bias = bool(config.get("attention_bias", False))
    tied = bool(config.get("tie_word_embeddings", model_type not in ("qwen", "internlm2")))
    if model_type == "qwen":
        tied = bool(config.get("tie_word_embeddings", False))
    saved = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return ArchFacts(
        checkpoint_bytes=4 if "32" in saved else 2,
        model_type=model_type or "llama",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tied_embeddings=tied,
        qkv_bias=qkv_bias,
        source=source,
    )


@lru_cache(maxsize=1)
def builtin_table() -> dict[str, dict[str, Any]]:
    text = (resources.files("tunesmith") / "resources" / "plan" / "architectures.json").read_text("utf-8")
    return {key: value for key, value in json.loads(text).items() if not key.startswith("_")}


def lookup_builtin(name: str) -> ArchFacts | None:
    """The built-in facts for a hub id, its last path component, or an alias (case-insensitive)."""
    wanted = name.strip().rstrip("/").lower()
    last = wanted.split("/")[-1]
    for hub_id, facts in builtin_table().items():
        names = {hub_id.lower(), hub_id.lower().split("/")[-1], *(a.lower() for a in facts.get("aliases", ()))}
        if wanted in names or last in names:
            return facts_from_config(facts, source=f"built-in table ({hub_id})")
    return None


def facts_for_model(name_or_path: str | None, cache_dir: str | None = None) -> ArchFacts | None:
    """Facts for ``model_name_or_path``: the folder's config.json (for a packaged alias: its converted copy in the
    cache, when there is one), else the built-in table; None if neither."""
    if not name_or_path:
        return None
    from tunesmith.model.resolve import PACKAGED_MODELS, cache_root

    path = Path(str(name_or_path)).expanduser()
    alias = str(name_or_path).strip().lower()
    if alias in PACKAGED_MODELS and not path.exists():
        path = cache_root(cache_dir) / "models" / alias
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is not None and config_file.is_file():
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON: plan from the name
            data = None
        if isinstance(data, dict):
            facts = facts_from_config(data, source=str(config_file))
            if facts is not None:
                return facts
    return lookup_builtin(str(name_or_path))
