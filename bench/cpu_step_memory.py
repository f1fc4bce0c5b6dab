"""One CPU lever at a time, in whole tunesmith runs: step time, peak RSS and the memory malloc holds live.

    python bench/cpu_step_memory.py [--method full] [--setting best_fp32] [--samples 40] [--runs 2] KEY=VALUE ...

Each KEY=VALUE is an arm (e.g. ``lean_activations=false``; ``a=1,b=2`` sets both in one arm); a ``base`` arm with no extra key always runs.
``saved_recipes=false`` is not a config key: that arm keeps the lean modules and segment attention but never lets
autograd keep their outputs as recipes (``tunesmith.model.saved_recipes``), to measure that lever alone;
``norm_casts=false`` (also not a key) lets autocast cast the norms' float32 outputs per projection again, as
before the lean norms handed out the autocast dtype (``--setting best`` only); ``gemm_attention=false`` (not a key
either) computes every sample's attention with SDPA in float32 again, as before short samples in bf16 took two
GEMMs (``tunesmith.model.gemm_attention``; ``--setting best`` only); ``keep_freed=false`` leaves glibc's
malloc at its defaults (``tunesmith.train.host_memory``). The workload is ``bench/vs_llamafactory.py``'s config at
``--setting`` (``best_fp32``; ``best`` adds bf16): SmolLM2-135M-Instruct, packed alpaca_en_demo, cutoff 512,
batch 4, run in-process with ``tunesmith.train.train`` once per arm and run, each in a fresh
subprocess. Per run it prints the median step time of steps 2.., the peak RSS (``ru_maxrss``) and the peak of
``mallinfo2()``'s bytes in use (sampled every 10 ms): glibc's heap keeps its high-water mark, so a lever that
frees memory shows in the live bytes first, and in the RSS only where the heap's layout lets it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_llamafactory import config, smollm2_folder  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _live_sampler(peak: dict[str, int]) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    while True:
        info = libc.mallinfo2()
        peak["live"] = max(peak["live"], info.uordblks + info.hblkhd)
        time.sleep(0.01)


def run_arm(method: str, setting: str, samples: int, extra: dict) -> dict:
    """In this process: one tunesmith run; its step times and memory."""
    from tunesmith.config.load import load_config
    from tunesmith.train.pipeline import train

    if extra.pop("saved_recipes", True) is False:
        from tunesmith.model import lean_activations, segment_attention

        lean_activations.remember = segment_attention.remember = lambda *args: None
    if extra.pop("gemm_attention", True) is False:
        from tunesmith.model import gemm_attention

        gemm_attention.autocast_dtype = lambda device: None
    if extra.pop("keep_freed", True) is False:
        import tunesmith.train.pipeline as pipeline

        pipeline.keep_freed_host_memory = lambda: False
    if extra.pop("norm_casts", True) is False:
        from tunesmith.model.lean_activations import LeanRMSNorm

        LeanRMSNorm._linear_input_dtype = lambda self, hidden_states: None
    work = Path(tempfile.mkdtemp())
    (work / "run.yaml").write_text(yaml.safe_dump(config(method, setting, samples, smollm2_folder(),
                                                         work / "out", extra)))
    peak = {"live": 0}
    threading.Thread(target=_live_sampler, args=(peak,), daemon=True).start()
    stamps: list[float] = []
    train(load_config(work / "run.yaml"), callbacks=[lambda state: stamps.append(time.perf_counter())])
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"median_step_s": statistics.median(steps) if steps else float("nan"), "steps": len(stamps),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "peak_live_gb": peak["live"] / 1024**3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arms", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--method", default="full", choices=("full", "lora"))
    parser.add_argument("--setting", default="best_fp32", choices=("best_fp32", "best"))
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_arm(args.method, args.setting, args.samples, json.loads(args.child))))
        return
    arms = {"base": {}} | {arm: {key: yaml.safe_load(value) for key, _, value in
                                 (pair.partition("=") for pair in arm.split(","))} for arm in args.arms}
    print(f"{args.method}, {args.setting}, {args.samples} samples, {torch_threads()} threads; runs alternate arms")
    print(f"{'arm':<32}{'median step s':>14}{'peak RSS GB':>13}{'peak live GB':>14}")
    for _ in range(args.runs):
        for name, extra in arms.items():
            out = subprocess.run([sys.executable, __file__, "--method", args.method, "--setting", args.setting,
                                  "--samples", str(args.samples),
                                  "--child", json.dumps(extra)], capture_output=True, text=True,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:<32}{row['median_step_s']:>14.2f}{row['peak_rss_gb']:>13.2f}{row['peak_live_gb']:>14.2f}",
                  flush=True)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
