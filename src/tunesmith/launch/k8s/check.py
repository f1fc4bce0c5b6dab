"""Checking a ``tunesmith launch k8s``: every option and the config, refused with one sentence naming what is
wrong before anything is rendered or submitted, into the frozen :class:`CheckedK8s` job that is all
:mod:`tunesmith.launch.k8s.render` reads.

The config becomes the YAML text the pods train (``config_text``); paths in it that the pods will not find
become warnings.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import yaml

from tunesmith.errors import ConfigError
from tunesmith.launch.k8s.options import (
    ACCELERATORS,
    ASCEND,
    CONFIG_FILE,
    CONFIG_MOUNT,
    GPU,
    RESTART_POLICIES,
    K8sOptions,
)

if TYPE_CHECKING:  # the schema (pydantic) loads only when a config does: `tunesmith --help` stays fast
    from tunesmith.config.schema import Config

# A job name becomes pod and Service names such as NAME-worker-12: the operator requires a DNS-1035 label, and
# the suffix must still fit in 63 characters.
MAX_NAME = 50
MAX_CONFIG_MAP = 1_000_000  # bytes: the API server refuses larger ConfigMaps (1 MiB minus metadata)
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # namespaces
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
# Set by the training operator in every pod (or, for `tunesmith train`, overriding what it sets): a user value
# would fight the operator's rendezvous. The launch options set them instead.
OPERATOR_ENV = (
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "NNODES", "NPROC_PER_NODE",
    "RDZV_ID", "RDZV_BACKEND", "RDZV_ENDPOINT", "MIN_NNODES", "MAX_NNODES", "MAX_RESTARTS",
)  # fmt: skip
# Config keys that name files or folders: in the pod they must be pod paths (on a PVC), not this machine's.
PATH_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "dataset",
    "dataset_dir",
    "eval_dataset",
    "output_dir",
    "logging_dir",
    "cache_dir",
    "tokenized_path",
    "resume_from_checkpoint",
    "export_dir",
)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Pvc:
    claim: str
    mount: str
    read_only: bool = False


@dataclass(frozen=True)
class CheckedOptions:
    """The launch options after validation: parsed, typed, ready to render."""

    image: str
    replicas: tuple[tuple[str, int], ...]  # (("Master", 1), ("Worker", N-1)), or (("Worker", N),) with --elastic
    nproc_per_node: int
    accelerator: str
    pvcs: tuple[Pvc, ...]
    env: tuple[tuple[str, str], ...]
    elastic: tuple[int, int] | None
    max_restarts: int
    restart_policy: str
    node_selector: tuple[tuple[str, str], ...]
    namespace: str | None = None
    cpu: str | None = None
    memory: str | None = None
    shm_size: str | None = None
    workdir: str | None = None
    image_pull_secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckedK8s:
    """A valid job: its name, the checked options and the config text the pods train, and what to warn about."""

    name: str
    options: CheckedOptions
    config_text: str  # the ConfigMap's file, with a header saying where it came from
    warnings: tuple[str, ...]
    mesh: str = ""  # "mesh: dp 4 × sp 1 × tp 2 × pp 1 (8 ranks)", checked against the job's world size

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"


# ------------------------------------------------------------------------------------------------ options


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{option} {value} is not allowed; it must be at least 1")


def parse_pvc(text: str) -> Pvc:
    """``NAME:/mount`` or ``NAME:/mount:ro`` → :class:`Pvc`."""
    parts = text.split(":")
    read_only = len(parts) == 3 and parts[2] == "ro"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not read_only):
        raise ConfigError(
            f"--pvc {text!r} is not NAME:/mount or NAME:/mount:ro; write it like models:/models"
        )
    claim, mount = parts[0], parts[1]
    if not _DNS1123_SUBDOMAIN.match(claim) or len(claim) > 253:
        raise ConfigError(
            f"--pvc {text!r}: {claim!r} is not a valid PersistentVolumeClaim name; use lowercase "
            "letters, digits, '-' and '.'"
        )
    if not mount.startswith("/") or mount.rstrip("/") in ("", CONFIG_MOUNT, "/dev/shm", "/dev"):
        raise ConfigError(
            f"--pvc {text!r}: the mount path must be absolute and not /, {CONFIG_MOUNT} or /dev/shm; "
            "write it like models:/models"
        )
    return Pvc(claim, str(PurePosixPath(mount)), read_only)


def parse_env(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"--env {text!r} is not KEY=VALUE; write it like --env HF_HOME=/models/hf")
    key, value = text.split("=", 1)
    if not _ENV_NAME.match(key):
        raise ConfigError(f"--env {text!r}: {key!r} is not a valid environment variable name")
    if key in OPERATOR_ENV or key.startswith("PET_"):
        raise ConfigError(
            f"--env {key} would fight the rendezvous the training operator sets up in every pod; remove it "
            "(--nnodes, --nproc-per-node, --elastic and --max-restarts set these)"
        )
    return key, value


def parse_elastic(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not match:
        raise ConfigError(f"--elastic {text!r} is not MIN:MAX; write it like --elastic 1:4")
    low, high = int(match.group(1)), int(match.group(2))
    if low < 1 or high < low:
        raise ConfigError(f"--elastic {text}: MIN must be at least 1 and MAX at least MIN; write it like 1:4")
    return low, high


def _parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value) or len(value) > 63:
        raise ConfigError(f"--node-selector {text!r} is not a valid LABEL=VALUE; write it like gpu-type=a100")
    return key, value


def _check_image(image: str | None) -> str:
    if not image or not image.strip() or any(c.isspace() for c in image.strip()):
        raise ConfigError(
            "--image is missing or empty; pass the container image that has tunesmith installed, "
            "e.g. --image registry.example.com/tunesmith:0.1"
        )
    return image.strip()


def _check_words(opts: K8sOptions) -> None:
    """The options that are one word from a fixed set, a quantity, a name or a path."""
    if opts.accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator {opts.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    if opts.restart_policy not in RESTART_POLICIES:
        raise ConfigError(
            f"--restart-policy {opts.restart_policy!r} is not one of {', '.join(RESTART_POLICIES)}"
        )
    if opts.max_restarts < 0:
        raise ConfigError(f"--max-restarts {opts.max_restarts} is not allowed; it must be 0 or more")
    for option, value in (("--cpu", opts.cpu), ("--memory", opts.memory), ("--shm-size", opts.shm_size)):
        if value is not None and not _QUANTITY.match(value):
            raise ConfigError(
                f"{option} {value!r} is not a Kubernetes quantity; write it like 8, 500m, 64Gi or 16G"
            )
    if opts.namespace is not None and (not _DNS1123_LABEL.match(opts.namespace) or len(opts.namespace) > 63):
        raise ConfigError(
            f"--namespace {opts.namespace!r} is not a valid namespace name (lowercase letters, digits, '-')"
        )
    if opts.workdir is not None and not opts.workdir.startswith("/"):
        raise ConfigError(f"--workdir {opts.workdir!r} must be an absolute path inside the pod, e.g. /data")


def _replicas(opts: K8sOptions, elastic: tuple[int, int] | None) -> tuple[tuple[str, int], ...]:
    if elastic:
        nodes = opts.nnodes if opts.nnodes is not None else elastic[1]
        if not elastic[0] <= nodes <= elastic[1]:
            raise ConfigError(
                f"--nnodes {nodes} is outside --elastic {opts.elastic}; pick a node count in that range"
            )
        # Elastic jobs rendezvous on Worker 0 (c10d): the operator requires Workers and no fixed Master.
        return (("Worker", nodes),)
    nodes = opts.nnodes or 1
    return (("Master", 1), *((("Worker", nodes - 1),) if nodes > 1 else ()))


def check_options(opts: K8sOptions) -> CheckedOptions:
    """Every launch option checked before anything is rendered or submitted (one-sentence refusals)."""
    image = _check_image(opts.image)
    _positive(opts.nnodes, "--nnodes")
    _positive(opts.nproc_per_node, "--nproc-per-node")
    _check_words(opts)
    pvcs = tuple(parse_pvc(text) for text in opts.pvc)
    mounts = [p.mount for p in pvcs]
    if len(set(mounts)) != len(mounts):
        raise ConfigError("--pvc mounts two claims at the same path; give each --pvc its own mount path")
    env = tuple(parse_env(text) for text in opts.env)
    elastic = parse_elastic(opts.elastic) if opts.elastic else None
    return CheckedOptions(
        image=image,
        replicas=_replicas(opts, elastic),
        nproc_per_node=opts.nproc_per_node,
        accelerator=opts.accelerator,
        pvcs=pvcs,
        env=env,
        elastic=elastic,
        max_restarts=opts.max_restarts,
        restart_policy=opts.restart_policy,
        node_selector=tuple(dict(_parse_label(text) for text in opts.node_selector).items()),
        namespace=opts.namespace,
        cpu=opts.cpu,
        memory=opts.memory,
        shm_size=opts.shm_size,
        workdir=opts.workdir,
        image_pull_secrets=tuple(opts.image_pull_secret),
    )


def job_name(cfg: Config, explicit: str | None) -> str:
    """--name as given (checked), else one derived from run_name or output_dir's last folder."""
    if explicit is not None:
        if not _DNS1035.match(explicit) or len(explicit) > MAX_NAME:
            raise ConfigError(
                f"--name {explicit!r} is not a valid job name; use lowercase letters, digits and '-', "
                f"start with a letter, end with a letter or digit, at most {MAX_NAME} characters"
            )
        return explicit
    source = cfg.run_name or (PurePosixPath(cfg.output_dir.rstrip("/")).name if cfg.output_dir else "")
    name = re.sub(r"[^a-z0-9-]+", "-", source.lower())
    name = re.sub(r"-{2,}", "-", name).lstrip("-0123456789")[:MAX_NAME].rstrip("-")
    if not name:
        raise ConfigError(
            f"cannot derive a job name from run_name/output_dir ({source!r}); pass --name my-job"
        )
    return name


# ------------------------------------------------------------------------------------------------- config


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML: keys that differ from the defaults only, so it stays readable and loads
    back to the same :class:`Config`. A local ds_config.json path is inlined (the pods cannot see it)."""
    from tunesmith.config.schema import SECTIONS

    dumped = cfg.model_dump(mode="json", exclude_defaults=True)
    order = [key for section in SECTIONS.values() for key in section.model_fields]
    data = {key: dumped[key] for key in order if key in dumped}
    path = Path(cfg.deepspeed).expanduser() if isinstance(cfg.deepspeed, str) else None
    if path is not None and path.suffix == ".json" and path.is_file():
        try:  # read here, not via tunesmith.train (whose package import pulls in torch)
            data["deepspeed"] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            where = f"{path}:{err.lineno}"
            raise ConfigError(f"deepspeed: {where}: invalid JSON ({err.msg}); fix the file") from None
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _config_text(cfg: Config, source: str | None, mesh: str = "") -> str:
    header = (
        f"# resolved by `tunesmith launch k8s`{f' from {source}' if source else ''}; pods read it as "
        f"{CONFIG_MOUNT}/{CONFIG_FILE}\n" + (f"# {mesh}\n" if mesh else "")
    )
    text = header + config_yaml(cfg)
    if len(text.encode()) > MAX_CONFIG_MAP:
        raise ConfigError(
            f"the resolved config is {len(text.encode()) // 1024} KiB, more than a ConfigMap holds (1 MiB); "
            "move large inline values (deepspeed, evaluation_inputs) into files on a --pvc mount"
        )
    return text


def _path_values(cfg: Config) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    dataset_names = False
    for key in PATH_KEYS:
        value = getattr(cfg, key)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not item:
                continue
            if key in ("dataset", "eval_dataset") and "/" not in item and not item.endswith(DATA_SUFFIXES):
                dataset_names = True  # a name in dataset_dir/dataset_info.json, not a path
                continue
            if key == "model_name_or_path" and "/" not in item and not Path(item).exists():
                continue  # a packaged alias
            out.append((key, item))
    if not dataset_names:
        out = [(k, v) for k, v in out if k != "dataset_dir"]  # only read when datasets are given by name
    return out


def path_warnings(cfg: Config, pvcs: tuple[Pvc, ...] | list[Pvc], workdir: str | None) -> list[str]:
    """Config paths the pods will not find: absolute paths outside every --pvc mount, relative paths that do
    not resolve onto a mount."""
    mounts = [PurePosixPath(p.mount) for p in pvcs]

    def on_pvc(path: PurePosixPath) -> bool:
        return any(path == m or m in path.parents for m in mounts)

    warnings = []
    for key, value in _path_values(cfg):
        path = PurePosixPath(value)
        if path.is_absolute() or value.startswith("~"):
            if not on_pvc(path):
                warnings.append(
                    f"config key {key} = {value} is not under any --pvc mount: the pods will not find it "
                    "on this machine's disk; put it on a PersistentVolumeClaim and pass --pvc NAME:/mount"
                )
        elif not (workdir and on_pvc(PurePosixPath(workdir) / path)):
            where = (
                f"--workdir {workdir}, which is not on a --pvc mount"
                if workdir
                else "the image's working directory"
            )
            warnings.append(
                f"config key {key} = {value} is a relative path: in the pods it resolves against {where}; "
                "use an absolute path under a --pvc mount (or set --workdir to a mount)"
            )
    return warnings


def _device_warnings(cfg: Config, accelerator: str) -> list[str]:
    device = cfg.device.strip().lower()
    mismatch = (accelerator == ASCEND and device.startswith("cuda")) or (
        accelerator == GPU and device.startswith("npu")
    )
    return [f"config key device = {cfg.device} does not match --accelerator {accelerator}"] if mismatch else []


def check(cfg: Config, opts: K8sOptions, source: str | None = None) -> CheckedK8s:
    """The options and the config checked (``source``: the config file, named in the ConfigMap's header)."""
    cfg.require("model_name_or_path", "dataset", "output_dir")
    options = check_options(opts)
    name = job_name(cfg, opts.name)
    mesh = check_job_mesh(cfg, options)
    text = _config_text(cfg, source, mesh)
    warnings = path_warnings(cfg, options.pvcs, options.workdir) + _device_warnings(cfg, options.accelerator)
    return CheckedK8s(name=name, options=options, config_text=text, warnings=tuple(warnings), mesh=mesh)


def check_job_mesh(cfg: Config, options: CheckedOptions) -> str:
    """The mesh line of the job's world (pods × --nproc-per-node); with --elastic, every node count in its range
    must tile too, since the job may run on any of them. A mesh that does not divide is refused here."""
    from tunesmith.plan.mesh import check_mesh, mesh_line

    nodes = sum(count for _, count in options.replicas)

    def tile(count: int) -> dict[str, int]:
        where = f"--nnodes {count} × --nproc-per-node {options.nproc_per_node}"
        if options.elastic:
            where += f", within --elastic {options.elastic[0]}:{options.elastic[1]}"
        return check_mesh(cfg, count * options.nproc_per_node, where)

    sizes = tile(nodes)
    for count in range(options.elastic[0], options.elastic[1] + 1) if options.elastic else ():
        tile(count)
    return mesh_line(sizes)
