"""What a cluster scheduler sets, mapped onto tunesmith's launch settings (the LLaMA-Factory names).

``tunesmith train CONFIG`` runs unchanged wherever a scheduler started it:

- **Kubeflow PyTorchJob** (training-operator v1). Every pod gets ``MASTER_ADDR`` (the master pod's service),
  ``MASTER_PORT``, ``RANK`` (master 0, worker *i* → *i*+1) and ``WORLD_SIZE``; since v1.7 also ``PET_NNODES``
  (the replica count), ``PET_NODE_RANK`` (= ``RANK``) and ``PET_NPROC_PER_NODE`` (``spec.nprocPerNode``, default
  ``auto``; ``WORLD_SIZE`` is then replicas × nprocPerNode, or replicas when it is ``auto``). An elastic job
  (``elasticPolicy``, usually workers only, no master variables) gets ``PET_RDZV_ENDPOINT``
  (``<job>-worker-0:<port>``), ``PET_RDZV_BACKEND`` (c10d), ``PET_NNODES`` (``MIN:MAX``) and optionally
  ``PET_RDZV_ID``, ``PET_RDZV_CONF``, ``PET_MAX_RESTARTS``, ``PET_NPROC_PER_NODE``. With any ``PET_`` launch
  variable the pod is one *node*: tunesmith starts torchrun there with those settings. Without them (operators
  before v1.7) the pod is one *worker*: it joins the job through ``env://`` as local rank 0.
- **Slurm**, one task per node (``srun --ntasks-per-node=1 tunesmith train CONFIG``): nodes from
  ``SLURM_NNODES`` / ``SLURM_JOB_NUM_NODES``, this node's rank from ``SLURM_NODEID``, processes from
  ``SLURM_GPUS_ON_NODE`` (else one per visible GPU), the master from the first host of ``SLURM_JOB_NODELIST``
  (the compressed form, ``node[01-03,07],gpu5``, is expanded here: ``scontrol`` may be absent) and an elastic c10d
  rendezvous with id ``SLURM_JOB_ID`` on ``MASTER_PORT`` (default ``15000 + SLURM_JOB_ID mod 15000``, the same on
  every node). With several tasks per node inside an ``srun`` step, each task is one worker instead (``RANK`` =
  ``SLURM_PROCID``, ``LOCAL_RANK`` = ``SLURM_LOCALID``, ``WORLD_SIZE`` = ``SLURM_NTASKS``).

Explicitly set LLaMA-Factory variables (``NNODES``, ``NODE_RANK``, ``NPROC_PER_NODE``, ``MASTER_ADDR``,
``MASTER_PORT``, ``RDZV_ID``, ``RDZV_BACKEND``, ``RDZV_ENDPOINT``, ``MIN_NNODES``, ``MAX_NNODES``,
``MAX_RESTARTS``) always win over what is derived here, and the CLI flags win over both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping, Sequence

from tunesmith.errors import ConfigError

# PyTorchJob's variables that make a pod a node running torchrun (the first spelling is torchrun's own; the second
# is what elastic jobs of training-operator before v1.7 set)
PET_NPROC = ("PET_NPROC_PER_NODE", "PET_N_PROC_PER_NODE")
PET_LAUNCH = (*PET_NPROC, "PET_NNODES", "PET_RDZV_ENDPOINT")
LAUNCH_ENV = ("NNODES", "NPROC_PER_NODE", "FORCE_TORCHRUN", "RDZV_ID", "MIN_NNODES", "MAX_NNODES")
WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# A Slurm job's rendezvous port: below Linux's ephemeral range (32768+), above Slurm's own 6817/6818; the job id
# spreads concurrent jobs that share a first node over SLURM_PORT_SPAN ports.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 15000


# ------------------------------------------------------------------------------------------ Slurm node lists


def _split_top_level(text: str) -> list[str]:
    """``a[1-2,5],b`` → ``["a[1-2,5]", "b"]``: commas inside brackets belong to the range."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError("unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError("unbalanced brackets")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_host(item: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end() :]
    hosts: list[str] = []
    for part in match.group(1).split(","):
        part = part.strip()
        if "-" in part:
            low, high = part.split("-", 1)
            if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
                raise ValueError(f"bad range {part!r}")
            values = [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]  # node[01-03]: keep 0s
        elif part.isdigit():
            values = [part]
        else:
            raise ValueError(f"bad range {part!r}")
        for value in values:
            hosts.extend(_expand_host(prefix + value + suffix))  # a second bracket: rack[1-2]-n[1-4]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded in order: ``node[01-03,07],gpu5`` → node01 node02 node03 node07
    gpu5 (what ``scontrol show hostnames`` prints)."""
    try:
        hosts = [host for item in _split_top_level(nodelist) for host in _expand_host(item)]
    except ValueError as err:
        raise ConfigError(
            f"SLURM_JOB_NODELIST={nodelist!r} cannot be read ({err}); set MASTER_ADDR to the first node's address"
        ) from None
    if not hosts:
        raise ConfigError("SLURM_JOB_NODELIST is empty; set MASTER_ADDR to the first node's address")
    return hosts


# ------------------------------------------------------------------------------------------ the mapping


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def slurm_master_port(job_id: str) -> int:
    """A port every node of the job computes alike, spread so that two jobs sharing a node rarely collide (the
    sbatch script of ``tunesmith launch slurm`` computes the same)."""
    digits = re.sub(r"\D", "", job_id) or "0"  # array jobs: 1234_7
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def _pytorchjob(env: Mapping[str, str]) -> dict[str, str]:
    out = {
        "NPROC_PER_NODE": _first(env, *PET_NPROC),
        "NNODES": _first(env, "PET_NNODES"),
        "NODE_RANK": _first(env, "PET_NODE_RANK", "RANK"),
        "MASTER_ADDR": _first(env, "PET_MASTER_ADDR", "MASTER_ADDR"),
        "MASTER_PORT": _first(env, "PET_MASTER_PORT", "MASTER_PORT"),
        "RDZV_ENDPOINT": _first(env, "PET_RDZV_ENDPOINT"),
        "RDZV_BACKEND": _first(env, "PET_RDZV_BACKEND"),
        "RDZV_ID": _first(env, "PET_RDZV_ID"),
        "RDZV_CONF": _first(env, "PET_RDZV_CONF"),
        "MAX_RESTARTS": _first(env, "PET_MAX_RESTARTS"),
    }
    if out["RDZV_ENDPOINT"] and not out["RDZV_ID"]:
        out["RDZV_ID"] = "none"  # torchrun's own default id: the endpoint is the job's own anyway
    return {k: v for k, v in out.items() if v is not None}


def _slurm_nodes(env: Mapping[str, str]) -> str | None:
    return _first(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")


def _slurm_tasks_are_workers(env: Mapping[str, str]) -> bool:
    """Several tasks per node inside an srun step: each task is one rank (the batch script itself never is)."""
    if _first(env, "SLURM_STEP_ID", "SLURM_STEPID") is None or _first(env, "SLURM_PROCID") is None:
        return False
    try:
        tasks, nodes = int(_first(env, "SLURM_NTASKS", "SLURM_NPROCS") or 0), int(_slurm_nodes(env) or 1)
    except ValueError:
        return False
    return tasks > nodes


def _slurm(env: Mapping[str, str]) -> dict[str, str]:
    job_id, nodes = env["SLURM_JOB_ID"].strip(), _slurm_nodes(env)
    out: dict[str, str] = {"NNODES": nodes or "1", "NODE_RANK": _first(env, "SLURM_NODEID") or "0"}
    gpus = _first(env, "SLURM_GPUS_ON_NODE")
    if gpus:
        out["NPROC_PER_NODE"] = gpus
    if out["NNODES"] != "1":  # one node needs no rendezvous across hosts
        nodelist = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        master = env.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else None)
        if master is None:
            raise ConfigError(
                "a Slurm job on several nodes without SLURM_JOB_NODELIST or MASTER_ADDR; export MASTER_ADDR "
                "(the first node's address) in the batch script"
            )
        port = env.get("MASTER_PORT") or str(slurm_master_port(job_id))
        out.update(MASTER_ADDR=master, MASTER_PORT=port, RDZV_ID=job_id)
    return out


def cluster_source(env: Mapping[str, str]) -> str:
    """Who started this process: ``worker`` (torchrun, the deepspeed launcher, or anything setting RANK,
    WORLD_SIZE, LOCAL_RANK), ``pytorchjob-node`` / ``pytorchjob-worker``, ``slurm-node`` / ``slurm-worker``, or
    ``""`` (a plain shell)."""
    if all(key in env for key in WORKER_ENV):
        return "worker"
    if any(_first(env, name) for name in PET_LAUNCH):
        return "pytorchjob-node"
    explicit = any(_first(env, name) for name in LAUNCH_ENV)
    if (
        not explicit
        and "SLURM_JOB_ID" not in env
        and all(_first(env, key) for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    ):
        return "pytorchjob-worker"  # or any launcher that sets the four env:// variables but not LOCAL_RANK
    if _first(env, "SLURM_JOB_ID"):
        return "slurm-worker" if _slurm_tasks_are_workers(env) else "slurm-node"
    return ""


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The LLaMA-Factory launch variables for this process: the explicit ones, completed from PyTorchJob's or
    Slurm's (empty for a worker: it is not launched)."""
    source = cluster_source(env)
    derived: dict[str, str] = {}
    if source == "pytorchjob-node":
        derived = _pytorchjob(env)
    elif source == "slurm-node":
        derived = _slurm(env)
    merged = dict(env)
    for key, value in derived.items():
        if not _first(env, key):
            merged[key] = value
    return merged


def adopt_worker_env(env: MutableMapping[str, str]) -> str:
    """Complete the torchrun worker variables where a scheduler started this process as one rank itself (a
    PyTorchJob pod of an operator before v1.7; several Slurm tasks per node), so that it joins through
    ``env://`` like a torchrun worker. Returns :func:`cluster_source`."""
    source = cluster_source(env)
    if source == "pytorchjob-worker":
        env.setdefault("LOCAL_RANK", "0")  # one process per pod
    elif source == "slurm-worker":
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = _first(env, "SLURM_LOCALID") or "0"
        env["WORLD_SIZE"] = _first(env, "SLURM_NTASKS", "SLURM_NPROCS") or "1"
        if _first(env, "SLURM_NTASKS_PER_NODE") and "LOCAL_WORLD_SIZE" not in env:
            per_node = env["SLURM_NTASKS_PER_NODE"].split("(")[0]  # "4(x2)" on uneven allocations
            if per_node.isdigit():
                env["LOCAL_WORLD_SIZE"] = per_node
        if "MASTER_ADDR" not in env:
            nodelist = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
            env["MASTER_ADDR"] = expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"
        env.setdefault("MASTER_PORT", str(slurm_master_port(env["SLURM_JOB_ID"])))
    return source


def strip_launcher_args(argv: Sequence[str], env: MutableMapping[str, str]) -> list[str]:
    """Drop the ``--local_rank=N`` (or ``--local-rank N``) that the ``deepspeed`` launcher and the old
    ``torch.distributed.launch`` put before the script's own arguments; its value becomes ``LOCAL_RANK`` when
    the launcher did not set that already."""
    out: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                value = words[i + 1] if i + 1 < len(words) else ""
                i += 1
            if value.isdigit():
                env.setdefault("LOCAL_RANK", value)
        else:
            out.append(word)
        i += 1
    return out
