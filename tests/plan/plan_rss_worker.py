"""Subprocess worker for test_plan_accuracy.py: train with tunesmith and print the peak resident set it added
beyond the imports (the definition bench/plan_accuracy.py uses)."""

from __future__ import annotations

import gc
import json
import resource
import sys


def rss_now() -> int:
    import os

    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import tunesmith.data  # noqa: F401
    import tunesmith.model.adapt  # noqa: F401
    import tunesmith.model.load  # noqa: F401
    from tunesmith.config import load_config
    from tunesmith.train import loop

    cfg = load_config(None, sys.argv[1:])
    gc.collect()
    baseline = rss_now()
    peaks: list[int] = []
    loop.train(cfg, callbacks=[lambda _state: peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)])
    print(json.dumps({"added": peaks[-1] * 1024 - baseline}))


if __name__ == "__main__":
    main()
