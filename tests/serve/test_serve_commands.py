"""The `serve` / `eval` subcommands: help texts, user errors, and a real `serve` process answering on loopback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from serve_helpers import free_port

from tunesmith.cli import main as commands_main
from tunesmith.evaluate.commands import add_parsers as add_eval_parsers
from tunesmith.serve.commands import add_parsers


def test_add_parsers_adds_serve_and_eval_with_help(capsys):
    parser = argparse.ArgumentParser(prog="tunesmith")
    subparsers = parser.add_subparsers(dest="command")
    add_parsers(subparsers)
    add_eval_parsers(subparsers)
    for command, words in (("serve", ["/v1/chat/completions", "--api-key", "--max-tokens-limit", "127.0.0.1"]),
                           ("eval", ["generated_predictions.jsonl", "BLEU-4", "KEY=VALUE"])):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(word in text for word in words), text
    args = parser.parse_args(["serve", "some-model"])
    assert (args.host, args.port, args.template) == ("127.0.0.1", 8000, "auto")


def test_cli_has_serve_and_eval():
    from tunesmith.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"serve", "eval"} <= set(commands), (
        "cli.py must add tunesmith.serve.commands and tunesmith.evaluate.commands parsers in build_parser"
    )


def test_serve_user_errors_exit_2_before_loading(tmp_path, capsys):
    assert commands_main(["serve", "no-such-model", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert commands_main(["serve", "no-such-model", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_process_answers_on_loopback(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "TUNESMITH_API_KEY": "sk-process"}
    log = (tmp_path / "serve.log").open("w")
    code = "import sys; from tunesmith.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(tiny_model_dir), "--port", str(port), "--max-tokens-limit", "8"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert json.load(response)["model"] == tiny_model_dir.name
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "the server did not come up in 60 s"
                time.sleep(0.2)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", body,
            {"Authorization": "Bearer sk-process", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught, so the exit status says SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
