"""CPU training under tcmalloc (or jemalloc) instead of glibc's malloc (``host_allocator``).

Why. PyTorch's CPU tensors come from the C allocator. A training step makes and frees tensors of many sizes
(activations, their gradients, per-sample attention pieces, logits chunks) while long-lived ones (gradients, the
optimizer state) appear in between; glibc's heap only shrinks from its top and, with
:mod:`tunesmith.train.host_memory` keeping freed pages for speed, never returns the holes. SmolLM2-135M full
fine-tuning in bf16 on 2 CPU cores holds 2.9 GB live at its peak while the heap grows to 4.1 GB (peak RSS 5.05
GB). tcmalloc hands out memory by size class and reuses a freed block for the next tensor of its size: the same
run peaks at 3.85 GB, and its step takes 6.2 instead of 7.4 s (fewer page faults, no heap consolidation). What
torch's own CPU launcher (``torch.backends.xeon.run_cpu``) and Intel's tuning guide recommend, done for the user.

How. An allocator must be loaded before the process starts (``LD_PRELOAD``), so ``tunesmith train`` starts itself
again with the library preloaded, once the config is checked and before the model loads (the restart costs one
more import of torch, a few seconds); torchrun's workers inherit the variable. ``auto`` does so only for a run that trains on the CPU (``device: cpu``, or ``auto`` on a machine without a GPU or NPU):
accelerators keep their own caching allocators, and their host code is left as it was. The restarted single
process also keeps its OpenMP threads spinning between operations (:func:`spinning_threads_env`); torchrun's
workers run one thread each (torchrun's default), so there is nothing to spin there.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from tunesmith.logging import get_logger
from tunesmith.runenv import ALLOCATORS

log = get_logger("launch")

PRELOADED_ENV = "TUNESMITH_PRELOADED"  # set on the restarted process: never restart twice
_LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
_ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/davinci_manager")
INSTALL_HINT = "apt install libtcmalloc-minimal4 (or conda install gperftools) for less memory"


@dataclass(frozen=True)
class AllocatorChoice:
    library: str | None  # the library to preload (a file name the dynamic loader finds, or a path); None: none
    note: str = ""  # one sentence for the log when a CPU run asked for an allocator and cannot have it


def find_library(name: str) -> str | None:
    """The shared library of allocator ``name`` (tcmalloc, jemalloc) on this machine, or None: the loader's
    cache, then this Python's prefix (a conda environment's ``lib``)."""
    for stem in _LIBRARIES[name]:
        found = ctypes.util.find_library(stem)
        if found:
            return found
        local = sorted(glob.glob(os.path.join(sys.prefix, "lib", f"lib{stem}.so*")))
        if local:
            return local[0]
    return None


def trains_on_cpu(device: str, accelerator_devices: tuple[str, ...] = _ACCELERATOR_DEVICES) -> bool:
    """Whether a run with ``device`` will train on the CPU, told without importing torch: ``auto`` picks the CPU
    where no NVIDIA, AMD or Ascend device node exists."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return not any(os.path.exists(path) for path in accelerator_devices)
    return name == "cpu"


def choose_allocator(setting: str, device: str, env: Mapping[str, str]) -> AllocatorChoice:
    """What ``host_allocator: setting`` asks for on this machine, for a run on ``device``."""
    preloaded = env.get("LD_PRELOAD", "")
    if setting == "system" or PRELOADED_ENV in env or any(name in preloaded for name in ALLOCATORS):
        return AllocatorChoice(None)  # asked for glibc's, or the user (or our restart) preloaded one already
    if not sys.platform.startswith("linux"):  # LD_PRELOAD and glibc are Linux's; macOS keeps its own malloc
        return AllocatorChoice(None)
    if setting == "auto" and not trains_on_cpu(device):
        return AllocatorChoice(None)
    for name in ("tcmalloc", "jemalloc") if setting == "auto" else (setting,):
        library = find_library(name)
        if library:
            return AllocatorChoice(library)
    wanted = "neither tcmalloc nor jemalloc is" if setting == "auto" else f"{setting} is not"
    return AllocatorChoice(None, f"host memory: glibc's malloc, since {wanted} installed here; {INSTALL_HINT}")


def preload_env(choice: AllocatorChoice, env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` with ``choice``'s library put first in ``LD_PRELOAD`` (unchanged when there is none)."""
    if choice.library:
        env["LD_PRELOAD"] = os.pathsep.join(p for p in (choice.library, env.get("LD_PRELOAD", "")) if p)
        env[PRELOADED_ENV] = "1"
        # tcmalloc reports every allocation above 1 GiB on stderr (an 8B model's embedding is one): not news here
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**50))
        # jemalloc at its defaults hands freed pages back within seconds and faults them in again next step
        # (SmolLM2 full fine-tuning: 7.99 s a step against 6.77 s keeping them; tcmalloc 6.20 s)
        env.setdefault("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    return env


def spinning_threads_env(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` with OpenMP's threads waiting actively (``OMP_WAIT_POLICY=active``) for one training process that
    owns the machine's cores: a step runs thousands of short parallel operations with Python in between, and
    waking a sleeping thread for each costs more than keeping it spinning (SmolLM2 LoRA, bf16, 2 cores: 5.82 /
    5.70 → 4.90 / 5.06 s a step; full fine-tuning 6.56 → 6.45 s). Left as it is where the user set a wait
    policy, asked for more threads than this process may run on, or made this process one rank of a job (a
    scheduler may have put other ranks on the same cores; spinning threads would then steal them)."""
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return env
    if env.get("WORLD_SIZE", "1").strip() not in ("", "1"):  # one rank of a job: others may share these cores
        return env
    threads = env.get("OMP_NUM_THREADS", "").strip()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads and (not threads.isdigit() or int(threads) > cores):
        return env
    env["OMP_WAIT_POLICY"] = "active"
    return env


def restart_under(choice: AllocatorChoice) -> None:
    """Replace this single training process by the same command with ``choice``'s library preloaded and its
    OpenMP threads spinning (:func:`spinning_threads_env`); returns only when there is nothing to preload.
    Nothing was trained or written yet; what was logged is flushed first."""
    if not choice.library:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    log.debug("restarting under %s", choice.library)
    env = spinning_threads_env(preload_env(choice, dict(os.environ)))
    os.execve(sys.executable, list(sys.orig_argv), dict(env))

