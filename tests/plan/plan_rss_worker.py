"""Subprocess worker for test_plan_accuracy.py: train with tunesmith and print the peak resident set it added
beyond the imports (the definition bench/plan_accuracy.py uses); run by torchrun, one file per rank."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path


def rss_now() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water_mark() -> int:
    """VmHWM: the peak resident set of this process's own memory. Not ``ru_maxrss``, which Linux carries over
    an exec from the forked parent: started from a big pytest process, it would report pytest's size."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import tunesmith.data  # noqa: F401
    import tunesmith.model.adapt  # noqa: F401
    import tunesmith.model.load  # noqa: F401
    from tunesmith.config import load_config
    from tunesmith.train import pipeline

    cfg = load_config(None, sys.argv[1:])
    gc.collect()
    baseline = rss_now()
    peaks: list[int] = []
    pipeline.train(cfg, callbacks=[lambda _state: peaks.append(high_water_mark())])
    line = json.dumps({"rank": int(os.environ.get("RANK", "0")), "added": peaks[-1] - baseline})
    if "PLAN_RSS_DIR" in os.environ:  # under torchrun each rank writes its own file: two ranks' prints can interleave
        Path(os.environ["PLAN_RSS_DIR"], f"rank{os.environ['RANK']}.json").write_text(line, encoding="utf-8")
    else:
        print(line, flush=True)


if __name__ == "__main__":
    main()
