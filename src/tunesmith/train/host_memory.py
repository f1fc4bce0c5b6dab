"""Training on CPU: keep freed memory in the process for the next step instead of returning it to the kernel.

PyTorch's CPU tensors come from glibc's ``malloc``, which serves every block above its mmap threshold (at most
32 MB) with a fresh ``mmap`` and gives it back with ``munmap`` when the tensor dies, and trims the heap's top
above its trim threshold. A training step makes and frees the same large tensors every step (activations,
logits, their gradients), so each step page-faults all of them in again: on 2 cores a SmolLM2 LoRA step at
2,048 tokens took ~360,000 minor faults, about a second of a 13-second step, spent zeroing pages the process
had just given back. With mmap off and the trim threshold at its maximum, the heap keeps those pages and the
next step reuses them (the same thing jemalloc or tcmalloc give PyTorch CPU training). The peak memory is
unchanged; memory is not returned before the process ends. GPU memory has its own caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from tunesmith.logging import get_logger
from tunesmith.runenv import loaded_allocator

log = get_logger("train")

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_LARGEST = 2**31 - 1  # mallopt takes an int


@functools.cache
def keep_freed_host_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (once per process); False where the C library is not
    glibc (musl, macOS) or another allocator is preloaded, where nothing changes."""
    if loaded_allocator():
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))
    if done:
        log.debug("host memory: malloc keeps freed blocks for the next step (no mmap, no trimming)")
    return done
