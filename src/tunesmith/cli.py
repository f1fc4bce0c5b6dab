"""The `tunesmith` command: each subcommand is a thin call into a module below.

Heavy imports (torch, transformers) happen inside the handlers so `tunesmith --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from tunesmith import __version__
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.commands import add_parsers as add_eval_parsers
from tunesmith.launch.commands import add_parsers as add_launch_parsers
from tunesmith.launch.local import cmd_train
from tunesmith.logging import get_logger, setup_logging
from tunesmith.plan.commands import add_parsers as add_plan_parsers
from tunesmith.recipes.commands import add_parsers as add_recipes_parsers
from tunesmith.serve.commands import add_parsers as add_serve_parsers

log = get_logger()


def _cmd_export(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config

    extra = []
    if args.model:
        extra.append(f"model_name_or_path={args.model}")
    if args.adapter:
        extra.append(f"adapter_name_or_path={args.adapter}")
    if args.out:
        extra.append(f"export_dir={args.out}")
    if args.size is not None:
        extra.append(f"export_size={args.size}")
    if args.dtype:
        extra.append(f"export_dtype={args.dtype}")
    if args.template:
        extra.append(f"template={args.template}")
    if args.format:
        extra.append(f"export_format={args.format}")
    if args.quantization:
        extra.append(f"export_quantization={args.quantization}")
    cfg = load_config(args.config, [*args.overrides, *extra])
    cfg.require("model_name_or_path", "export_dir")
    from tunesmith.export.merge import export_from_config

    out = export_from_config(cfg)
    if cfg.export_format == "gguf":
        log.info("exported to %s (try: cd %s && ollama create NAME -f Modelfile)", out, out)
    else:
        log.info("exported to %s (try: tunesmith chat %s)", out, out)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.to == "mindspore" and args.from_ == "mindspore":
        raise TunesmithError("--to mindspore and --from mindspore exclude each other; give one direction")
    if args.to == "mindspore":
        from tunesmith.export.mindspore import hf_to_mindspore

        print(hf_to_mindspore(args.checkpoint, Path(args.out), args.dtype).describe("MindSpore checkpoint"))
        return 0
    if args.from_ == "mindspore":
        if not args.config_from:
            raise TunesmithError(
                "--from mindspore needs --config-from HF_MODEL (the model the checkpoint was made from: its "
                "config.json and tokenizer go into the HF folder)"
            )
        from tunesmith.export.mindspore import mindspore_to_hf

        out = mindspore_to_hf(Path(args.checkpoint), Path(args.out), args.config_from, args.dtype)
        print(out.describe("HF folder"))
        return 0
    if args.dtype or args.config_from:
        flag = "--dtype" if args.dtype else "--config-from"
        raise TunesmithError(f"{flag} applies to --to mindspore / --from mindspore only; drop it here")
    from tunesmith.export.convert import convert_checkpoint, describe

    print(describe(convert_checkpoint(args.checkpoint, args.out)))
    return 0


def _cmd_llama_pro(args: argparse.Namespace) -> int:
    from tunesmith.model.llama_pro import expand_model_folder

    out = expand_model_folder(args.model, args.out, args.num_expand, trust_remote_code=args.trust_remote_code)
    print(f"expanded model written to {out}; fine-tune it with:\n  model_name_or_path: {out}\n"
          f"  finetuning_type: freeze\n  freeze_trainable_layers: {args.num_expand}\n  use_llama_pro: true")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from tunesmith.serve.chat import run_chat

    return run_chat(
        args.model,
        adapter=args.adapter,
        system=args.system,
        prompt=args.prompt,
        template=args.template,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from tunesmith.demo import demo_config, run_demo

    if getattr(args, "own_process", False):  # on CPU, the demo trains under tcmalloc too (launch/host_allocator.py)
        from tunesmith.launch.host_allocator import choose_allocator, restart_under

        cfg = demo_config(args.name, args.author, args.steps, args.output_dir, args.overrides)
        restart_under(choose_allocator(cfg.host_allocator, cfg.device, os.environ))
    return run_demo(
        name=args.name, author=args.author, steps=args.steps, output_dir=args.output_dir, overrides=args.overrides
    )


def _cmd_data(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.require("model_name_or_path", "dataset")
    from tunesmith.data.preview import preview
    from tunesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer(
        cfg.model_name_or_path, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
    )
    return preview(cfg, tokenizer, show=args.show)


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunesmith.config import load_config

    is_config = Path(args.target).suffix.lower() in (".yaml", ".yml")
    if is_config:
        cfg = load_config(args.target, args.overrides)
        cfg.require("dataset")
        if args.model:
            cfg.model_name_or_path = args.model
    elif args.model:
        cfg = load_config(None, [*args.overrides, f"model_name_or_path={args.model}"])
        cfg.dataset = [args.target]
    else:
        cfg = None  # a bare file without --model: rows and malformed rows only, no token counts
    if cfg is not None and args.template:
        cfg.template = args.template
    tokenizer = None
    if cfg is not None and cfg.model_name_or_path:
        from tunesmith.model.load import load_tokenizer

        tokenizer = load_tokenizer(
            cfg.model_name_or_path, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
        )
    from tunesmith.data.inspect import inspect

    plot = None if args.no_plot else Path(args.plot)
    text, bad = inspect(args.target, cfg, tokenizer, plot)
    print(text)
    return 1 if bad else 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.to == "mindrecord":  # a YAML config (datasets, template, tokenizer), or one file with --model
        from tunesmith.config import load_config

        if Path(args.input).suffix.lower() in (".yaml", ".yml"):
            cfg = load_config(args.input, args.overrides)
            cfg.require("model_name_or_path", "dataset")
            if args.model:
                cfg.model_name_or_path = args.model
        elif args.model:
            cfg = load_config(None, [*args.overrides, f"model_name_or_path={args.model}"])
            cfg.dataset = [args.input]
        else:
            raise TunesmithError(
                f"{args.input} is not a YAML config; give a config, or add --model MODEL (its tokenizer) for a bare file"
            )
        if args.template:
            cfg.template = args.template
        from tunesmith.data.mindrecord import check_out, write_mindrecord
        from tunesmith.model.load import load_tokenizer

        check_out(Path(args.out))  # before the tokenizer loads: a wrong --out fails at once
        tokenizer = load_tokenizer(cfg.model_name_or_path, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
        print(write_mindrecord(cfg, tokenizer, Path(args.out), args.seq_length, args.label_column).describe())
        return 0
    stray = [flag for flag, value in (("--seq-length", args.seq_length), ("--model", args.model),
             ("--template", args.template), ("KEY=VALUE", args.overrides)) if value]
    if stray:
        raise TunesmithError(f"{stray[0]} applies to --to mindrecord only; drop it when writing {args.to} rows")
    from tunesmith.data.convert import convert_file

    written, extra = convert_file(Path(args.input), args.to, Path(args.out))
    dropped = f"; {extra} rows had non-conversation columns, dropped" if extra else ""
    print(f"wrote {written} {args.to} rows to {args.out}{dropped}")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from tunesmith.envinfo import environment_report

    print(environment_report())
    return 0


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("config", help="YAML config file (LLaMA-Factory keys; see README's config reference)")
    else:
        p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. learning_rate=5e-4")


def _name_deepspeed_accelerator() -> None:
    """With DeepSpeed installed, libraries import it on the side (accelerate's ``unwrap_model`` inside
    ``save_pretrained``), and it then guesses its accelerator, warning in every process of a machine without one.
    Name the CPU there; anywhere else DeepSpeed's own detection stays in charge."""
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    if torch.cuda.is_available() or has_xpu or torch.backends.mps.is_available():
        return
    if importlib.util.find_spec("torch_npu") is not None or importlib.util.find_spec("habana_frameworks"):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune chat LLMs end to end: data → config → train → checkpoint/resume → export → chat.",
    )
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train from a YAML config (re-running resumes from the newest checkpoint)")
    _add_config_args(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print the resolved launch (engine, ranks, global batch) and the memory plan; "
        "train nothing",
    )
    launch = p.add_argument_group(
        "distributed (runs torchrun; each flag defaults to the env variable of the same name, as in LLaMA-Factory)"
    )
    launch.add_argument("--nproc-per-node", type=int, metavar="N", help="processes on this node (NPROC_PER_NODE)")
    launch.add_argument("--nnodes", type=int, metavar="N", help="nodes in the job (NNODES)")
    launch.add_argument("--node-rank", type=int, metavar="R", help="this node's rank, 0..nnodes-1 (NODE_RANK)")
    launch.add_argument("--master-addr", metavar="HOST", help="address of node 0 (MASTER_ADDR)")
    launch.add_argument("--master-port", type=int, metavar="PORT", help="port on node 0 (MASTER_PORT)")
    launch.add_argument(
        "--max-restarts",
        type=int,
        metavar="N",
        help="restart the job up to N times when a rank fails; it resumes from the newest checkpoint "
        "(MAX_RESTARTS; default 0)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="merge an adapter into its base and write an HF folder or a GGUF file")
    _add_config_args(p, required=False)
    p.add_argument("--model", help="base model (folder, .gguf, or packaged alias)")
    p.add_argument("--adapter", help="LoRA adapter folder, e.g. RUN/checkpoint-N")
    p.add_argument("--out", help="output folder (export_dir)")
    p.add_argument("--size", type=int, help="largest shard in GB (export_size)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="export_dtype")
    p.add_argument("--template", help="chat template written into the tokenizer (default: the config's)")
    p.add_argument("--format", choices=["hf", "gguf"],
                   help="export_format: hf (safetensors folder) or gguf (llama.cpp / Ollama file + Modelfile)")
    p.add_argument("--quantization", choices=["f32", "f16", "bf16", "q8_0"],
                   help="export_quantization: GGUF weight type (default f16)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "convert",
        help="turn a checkpoint of any engine (ddp, fsdp2, deepspeed ZeRO) into an HF or PEFT folder; HF models "
        "to and from MindSpore checkpoints (MindFormers names)",
    )
    p.add_argument(
        "checkpoint",
        help="an output_dir/checkpoint-N (or a run's output_dir); with --to mindspore an HF model (folder, .gguf, "
        "alias); with --from mindspore a MindSpore .ckpt",
    )
    p.add_argument("--out", required=True, help="the folder to write (with --to mindspore: the .ckpt file)")
    p.add_argument("--to", choices=["mindspore"], help="write a MindSpore checkpoint with MindFormers' names")
    p.add_argument("--from", dest="from_", choices=["mindspore"], help="read a MindFormers checkpoint, write HF")
    p.add_argument("--config-from", metavar="HF_MODEL",
                   help="with --from mindspore: the HF model (folder, .gguf, alias) whose config and tokenizer "
                   "the checkpoint belongs to")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="with --to/--from mindspore: the saved dtype (default: the source's)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "llama-pro", help="LLaMA Pro: add zero-initialised copies of decoder blocks (train them with use_llama_pro)"
    )
    p.add_argument("model", help="model folder, .gguf, or packaged alias")
    p.add_argument("out", help="the new folder for the expanded model")
    p.add_argument("--num-expand", type=int, required=True, metavar="N",
                   help="blocks to add: one after each group of layers / N (N must divide the layer count)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    p.set_defaults(func=_cmd_llama_pro)

    p = sub.add_parser("chat", help="chat with a model in the terminal (or answer one --prompt)")
    p.add_argument("model", help="model folder, .gguf, or packaged alias")
    p.add_argument("--adapter", help="LoRA adapter folder to apply")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this once and exit (scriptable)")
    p.add_argument("--template", default="auto", help="chat template (default: the tokenizer's own)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("demo", help="teach SmolLM2-135M-Instruct a new identity with LoRA (offline, ~5 min on CPU)")
    p.add_argument("--name", default="Tuney", help="the assistant's new name")
    p.add_argument("--author", default="the tunesmith team", help="who made it")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--output-dir", default=None, help="run folder (default: ./runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override demo config keys")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("data", help="inspect how a config's data is read, templated, masked and truncated")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    q = data_sub.add_parser("preview", help="encode the config's datasets, print the report and a few samples")
    _add_config_args(q)
    q.add_argument("--show", type=int, default=2, help="samples to print with their label masks")
    q.set_defaults(func=_cmd_data)
    q = data_sub.add_parser(
        "inspect", help="rows, format, every malformed row, token lengths and packing efficiency of a dataset"
    )
    q.add_argument("target", metavar="CONFIG|FILE", help="a YAML config, or one .json/.jsonl/.csv/.parquet file")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. cutoff_len=512")
    q.add_argument("--model", help="tokenizer for token stats (needed for a bare FILE; overrides the config's)")
    q.add_argument("--template", help="chat template (default: the config's; `auto` for a bare FILE)")
    q.add_argument("--plot", default="token_lengths.png", help="histogram PNG path (default: token_lengths.png)")
    q.add_argument("--no-plot", action="store_true", help="do not write the histogram")
    q.set_defaults(func=_cmd_data_inspect)
    q = data_sub.add_parser(
        "convert",
        help="rewrite a dataset file as openai, alpaca or sharegpt rows, or encode a config's datasets as "
        "MindRecord for MindFormers",
    )
    q.add_argument("input", metavar="IN", help="a .json/.jsonl/.csv/.parquet dataset file (--to mindrecord: a YAML "
                   "config, or a dataset file with --model)")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="--to mindrecord: override config keys")
    q.add_argument("--to", required=True, choices=["openai", "alpaca", "sharegpt", "mindrecord"],
                   help="the output format")
    q.add_argument("--out", required=True, help="output .json (list) or .jsonl file, or X.mindrecord")
    q.add_argument("--seq-length", type=int, metavar="N",
                   help="--to mindrecord: the model's seq_length; rows are N+1 tokens (default: cutoff_len)")
    q.add_argument("--label-column", default="target_ids", choices=["target_ids", "labels"],
                   help="--to mindrecord: name of the labels column (guide 002's Qwen YAML: target_ids; "
                   "MindFormers' Llama YAML: labels)")
    q.add_argument("--model", help="--to mindrecord: the tokenizer's model (needed for a bare dataset file)")
    q.add_argument("--template", help="--to mindrecord: chat template (default: the config's)")
    q.set_defaults(func=_cmd_data_convert)

    p = sub.add_parser("env", help="versions of tunesmith and its libraries, and the devices found")
    p.set_defaults(func=_cmd_env)

    add_serve_parsers(sub)  # serve: OpenAI-compatible API + chat page
    add_eval_parsers(sub)  # eval: predictions + metrics
    add_plan_parsers(sub)  # plan: per-device memory, verdict, cheapest fix
    add_recipes_parsers(sub)  # recipes list | show | copy
    add_launch_parsers(sub)  # launch k8s | slurm | ranktable, and jobs
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tunesmith.launch.cluster_env import strip_launcher_args  # light: no torch

    parser = build_parser()
    # the deepspeed launcher (and torch.distributed.launch) put --local_rank=N before our own arguments
    own_process = argv is None  # the `tunesmith` command itself, not a caller that imported main()
    argv = strip_launcher_args(sys.argv[1:] if argv is None else list(argv), os.environ)
    args, extra = parser.parse_known_args(argv)
    args.own_process = own_process
    # `tunesmith train cfg.yaml --nproc-per-node 2 lr=1e-4`: argparse stops filling `overrides` at the first
    # option, so KEY=VALUE words after an option arrive here; anything else is a real error.
    if extra:
        if hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(verbose=args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline-first: never reach for a hub at run time
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # HF's per-file bars drown our own progress bar
    if args.command not in ("launch", "jobs", "recipes", "plan"):  # these never import torch: keep them quick
        _name_deepspeed_accelerator()
    try:
        code = int(args.func(args) or 0)
    except TunesmithError as err:
        rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None
        print(f"tunesmith: error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        code = 130
    distributed = sys.modules.get("tunesmith.train.distributed")  # loaded only by commands that train
    return distributed.end_process(code) if distributed else code


if __name__ == "__main__":
    sys.exit(main())
