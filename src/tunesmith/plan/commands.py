"""``tunesmith plan CONFIG [KEY=VALUE ...] [--gpus 4x24GB] [--nodes N] [--nproc-per-node N] [--seq-len N]
[--json]``."""

from __future__ import annotations

import argparse
import json


def _cmd_plan(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.plan.planner import plan_config

    overrides = [*args.overrides, *([f"cutoff_len={args.seq_len}"] if args.seq_len else [])]
    cfg = load_config(args.config, overrides)
    cfg.require("model_name_or_path")
    report = plan_config(
        cfg,
        gpus=args.gpus,
        nodes=args.nodes,
        nproc_per_node=args.nproc_per_node,
        gpu_type=args.gpu_type,
        mfu=args.mfu,
    )
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="per-device memory (weights, gradients, optimizer, activations, buffers), whether it fits, the "
        "cheapest change that does, and tokens/s — from the config and the model's config.json alone",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. cutoff_len=4096")
    p.add_argument("--gpus", metavar="NxMEM", help="devices per node, e.g. 4x24GB, 8x64GB, 1x80GB, 8xA100")
    p.add_argument("--nodes", type=int, metavar="N", help="nodes (default 1)")
    p.add_argument("--nproc-per-node", type=int, metavar="N", help="processes per node (default: the --gpus count)")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help="plan rows of N tokens (sets cutoff_len): where sequence parallel becomes necessary")
    p.add_argument("--gpu-type", metavar="TYPE", help="accelerator for the FLOPs estimate: h100, a100, 4090, 910b, ...")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for tokens/s (0.40)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)
