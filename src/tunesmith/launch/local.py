"""``tunesmith train``: the local launch back-end. It validates the config, then either re-runs itself under
torchrun (:mod:`tunesmith.launch.torchrun`) or, in a worker (or a plain single process), trains
(:func:`tunesmith.train.train`) and predicts when the config asks for it. ``--dry-run`` prints what it would do.
"""

from __future__ import annotations

import argparse
import os

from tunesmith.config import Config, load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.logging import get_logger, is_main_process
from tunesmith.runenv import launched_by_torchrun

log = get_logger("launch")


def trains(cfg: Config) -> bool:
    """LLaMA-Factory's rule: do_train decides; unset (HF's default is false) means train unless do_predict."""
    if cfg.do_train is False and not cfg.do_predict:
        raise ConfigError(
            "do_train is false and do_predict is false, so `tunesmith train` has nothing to do; set do_train: true "
            "to train or do_predict: true to predict"
        )
    return cfg.do_train if cfg.do_train is not None else not cfg.do_predict


def cmd_train(args: argparse.Namespace) -> int:
    """``tunesmith train CONFIG [KEY=VALUE ...]`` with the launch flags of ``cli.build_parser``."""
    cfg = load_config(args.config, args.overrides)
    if not trains(cfg):  # a LLaMA-Factory predict config (do_predict without do_train): predict only
        if args.dry_run:
            print("do_predict without do_train: `tunesmith train` would only predict, as `tunesmith eval` does")
            return 0
        from tunesmith.evaluate.commands import cmd_eval

        log.info("do_predict without do_train: predicting with the configured model, not training")
        return cmd_eval(args)
    cfg.require("model_name_or_path", "dataset", "output_dir")
    if cfg.export_format == "gguf":  # refuse a model GGUF export cannot write before training it, not after
        from tunesmith.export.gguf import check_training_config

        check_training_config(cfg)
    if args.dry_run:  # validate, resolve the launch, plan memory; load and train nothing
        print(dry_run_report(cfg, args.nproc_per_node or cfg.ray_num_workers, args.nnodes, config_path=args.config,
                             overrides=args.overrides))
        return 0
    from tunesmith.launch.host_allocator import choose_allocator, preload_env, restart_under
    from tunesmith.launch.torchrun import launch_spec, run_torchrun, should_launch
    from tunesmith.train.engines import validate_engine_config

    spec = launch_spec(
        args.nproc_per_node or cfg.ray_num_workers,  # LLaMA-Factory's Ray workers: local torchrun processes
        args.nnodes,
        args.node_rank,
        args.master_addr,
        args.master_port,
        max_restarts=args.max_restarts,
        count_gpus=_counts_gpus(cfg),
    )
    # once, here, for the world the job will have: not as one error per rank under torchrun
    validate_engine_config(cfg, spec.nproc_per_node * spec.nnodes if should_launch(spec) else None)
    allocator = choose_allocator(cfg.host_allocator, cfg.device, os.environ)
    if allocator.note and is_main_process():
        log.info("%s", allocator.note)
    if should_launch(spec):  # re-run this very command as torchrun's workers (they see RANK etc. and train)
        worker_args = [*(["-v"] if args.verbose else []), "train", args.config, *args.overrides]
        preload_env(allocator, os.environ)  # the workers inherit it
        return run_torchrun(spec, worker_args)
    if getattr(args, "own_process", False):  # this process ends with the run: skip what it will not use
        restart_under(allocator)  # the same command under tcmalloc, before the model loads (host_allocator.py)
        from tunesmith.model.lean_imports import leave_unused_quantization_libraries_unimported

        leave_unused_quantization_libraries_unimported(cfg)
    return run_worker(cfg)


def run_worker(cfg: Config) -> int:
    """Train in this process (one rank of a job, or the whole job), then predict when do_predict asks."""
    from tunesmith.evaluate.predict import predict_after_training
    from tunesmith.launch.rendezvous import leave_after_other_agents
    from tunesmith.train import train
    from tunesmith.train.distributed import shutdown_distributed

    warn_before_oom(cfg)
    run = train
    if launched_by_torchrun():
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(train)  # an uncaught error's traceback goes into torchrun's failure summary
    result = run(cfg)
    shutdown_distributed()
    predict_after_training(cfg)  # do_predict: generate + score on the main process; a no-op otherwise
    log.info("training finished: step %d, final loss %.4f, run folder %s", result.global_step, result.final_loss,
             result.output_dir)
    leave_after_other_agents()  # node 0 of a static multi-node job: its agent, which hosts the store, leaves last
    return 0


def warn_before_oom(cfg: Config) -> None:
    """The memory plan's warning when this run will obviously not fit (rank 0 only; never raises)."""
    if not is_main_process():
        return
    from tunesmith.model.load import pick_device
    from tunesmith.plan import preflight
    from tunesmith.train.distributed import dist_info

    try:
        device = pick_device(cfg.device)
    except TunesmithError:
        return  # train() names the problem with the device itself
    for message in preflight(cfg, dist_info().world_size, device):
        log.warning("%s", message)


def _counts_gpus(cfg: Config) -> bool:
    return cfg.device.strip().lower() in ("auto", "cuda")


def dry_run_report(
    cfg: Config,
    nproc_per_node: int | None,
    nnodes: int | None,
    config_path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> str:
    """What ``tunesmith train --dry-run`` prints: the resolved engine, ranks, the mesh (checked: it must divide
    the world size), global batch, the torchrun command it would run, and the memory plan on this machine's
    devices."""
    from tunesmith.launch.torchrun import launch_spec, torchrun_command
    from tunesmith.plan.mesh import check_mesh, mesh_line

    spec = launch_spec(nproc_per_node, nnodes, count_gpus=_counts_gpus(cfg))
    world = spec.nproc_per_node * spec.nnodes
    engine = cfg.resolved_engine(world)
    sizes = check_mesh(cfg, world, f"{spec.nnodes} node(s) × {spec.nproc_per_node} process(es)")
    readers = sizes["dp"]  # the ranks of a sequence / tensor / pipeline group train the same samples
    split = readers < world
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * readers
    source = cfg.deepspeed if isinstance(cfg.deepspeed, str) else "inline mapping"
    lines = [
        f"engine: {engine}" + (f" ({source})" if engine == "deepspeed" else ""),
        f"world size: {world} ({spec.nnodes} node(s) × {spec.nproc_per_node} process(es))",
        mesh_line(sizes),
        f"global batch: {global_batch} = {cfg.per_device_train_batch_size} per device × "
        f"{cfg.gradient_accumulation_steps} accumulation × {readers}{' data-parallel' if split else ''} rank(s)",
    ]
    worker = ["train", config_path or "CONFIG", *overrides]
    if spec.needs_launch:
        port = spec.master_port or 29500
        lines.append("command: " + " ".join(torchrun_command(spec, worker, port)))
    else:
        lines.append("command: tunesmith " + " ".join(worker) + "  (one process, no torchrun)")
    lines += ["", _memory_plan(cfg, spec.nnodes, spec.nproc_per_node)]
    return "\n".join(lines)


def _memory_plan(cfg: Config, nnodes: int, nproc_per_node: int) -> str:
    from tunesmith.model.load import pick_device
    from tunesmith.plan import DeviceSpec, local_devices, plan_config

    try:
        device = pick_device(cfg.device)
        devices = local_devices(device, nnodes * nproc_per_node)
        if devices is not None and devices.kind == "cuda":
            import torch

            devices = DeviceSpec(count=devices.count, memory_bytes=devices.memory_bytes, kind="cuda",
                                 text=torch.cuda.get_device_name(0))
        return plan_config(cfg, nodes=nnodes, nproc_per_node=nproc_per_node, devices=devices).format()
    except TunesmithError as err:  # e.g. `device: npu` on a machine without one: the launch still prints
        return f"memory plan: not available ({err})"
