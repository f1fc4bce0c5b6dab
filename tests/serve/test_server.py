"""Several adapters on one base: the request's ``model`` picks the adapter (or the bare base), streams from two
adapters run in parallel in one server, and each answers as that adapter served alone; `--adapter` parsing and
`--backend vllm`'s command line and clean refusal."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest
import serve_helpers

from tunesmith.cli import main as cli_main
from tunesmith.model.generate import generate_reply
from tunesmith.serve.commands import parse_adapters
from tunesmith.serve.server import vllm_command

openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def random_adapter(model_dir, out_dir, seed: int):
    """A LoRA adapter with random A and B (PEFT's init_lora_weights=False), so it changes the greedy answer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.model.load import load_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(load_model(model_dir), config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: random_adapter(tiny_model_dir, root / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters):
    """Each model's greedy answer, served alone (a fresh load per adapter)."""
    from tunesmith.serve.chat import load_for_inference

    answers = {}
    for name, path in [("tiny-base", None), *adapters.items()]:
        model, tokenizer, template = load_for_inference(str(tiny_model_dir), str(path) if path else None, device="cpu")
        answers[name] = generate_reply(model, tokenizer, template, MESSAGES, max_new_tokens=16)
    assert len(set(answers.values())) == 3, answers  # the adapters really answer differently
    return answers


@pytest.fixture(scope="module")
def multi_server(tiny_model_dir, adapters):
    from tunesmith.serve.app import ServerSettings
    from tunesmith.serve.server import load_served

    pairs = [(name, str(path)) for name, path in adapters.items()]
    model, tokenizer, template, served = load_served(str(tiny_model_dir), None, pairs, "auto", None, "cpu",
                                                     "tiny-base")
    settings = ServerSettings(model_id="tiny-base", api_key=serve_helpers.API_KEY, models=served,
                              context_length=1024)
    yield from serve_helpers.serving(model, tokenizer, template, settings)


def test_two_adapters_stream_in_parallel_and_each_answers_as_served_alone(multi_server, expected):
    client = openai.OpenAI(base_url=f"{multi_server.base_url}/v1", api_key=multi_server.api_key, max_retries=0,
                           timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny-base", "alpha", "beta"]

    def stream(model_id: str) -> str:
        chunks = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=16, temperature=0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    order = ["alpha", "beta", "tiny-base", "beta", "alpha", "beta"]
    with ThreadPoolExecutor(max_workers=len(order)) as pool:
        answers = list(pool.map(stream, order, timeout=120))
    assert answers == [expected[name] for name in order]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=2)


def test_adapter_flags_name_adapters_and_keep_the_single_path_form(tmp_path, capsys):
    assert parse_adapters(["runs/a"]) == ("runs/a", [])
    assert parse_adapters(["a=runs/a", "b=runs/b"]) == (None, [("a", "runs/a"), ("b", "runs/b")])
    assert parse_adapters(["runs/a", "runs/b"]) == (None, [("a", "runs/a"), ("b", "runs/b")])
    odd = tmp_path / "x=y"
    odd.mkdir()
    assert parse_adapters([str(odd)]) == (str(odd), [])  # a folder whose name has "=" is still a folder
    for bad, words in ((["a=x", "a=y"], "repeat"), (["a="], "NAME=PATH")):
        assert cli_main(["serve", "base", *[f"--adapter={v}" for v in bad]]) == 2
        assert words in capsys.readouterr().err


def test_vllm_backend_command_and_refusal(adapters, capsys):
    cmd = vllm_command("base-dir", [("alpha", str(adapters["alpha"]))], host="127.0.0.1", port=9000,
                       api_key="k", model_id=None, max_batch_size=8)
    assert cmd[:3] == ["vllm", "serve", "base-dir"]
    assert cmd[cmd.index("--lora-modules") + 1] == f"alpha={adapters['alpha']}"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and cmd[cmd.index("--max-num-seqs") + 1] == "8"
    assert cmd[cmd.index("--served-model-name") + 1] == "base-dir" and "--enable-lora" in cmd
    if importlib.util.find_spec("vllm") is None:
        assert cli_main(["serve", "base-dir", "--backend", "vllm"]) == 2
        assert "pip install vllm" in capsys.readouterr().err
