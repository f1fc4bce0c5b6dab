"""Two CPU levers of a LoRA step, each against its baseline in the same process, steps interleaved (A B A B …) so
the machine's drift hits both alike:

* ``fused_lora``: PEFT's LoRA layers vs tunesmith's fused ones (model/fused_lora.py);
* ``host memory``: glibc's default malloc (large blocks mmapped and unmapped every step) vs malloc keeping freed
  memory (train/host_memory.py), with the minor page faults per step.

    python bench/lora_levers.py [--steps 6] [--batch 4] [--seq 512] [--layers 30] [--rank 8]

Workload: SmolLM2-135M-Instruct (the packaged GGUF converted into tunesmith's cache), fp32, LoRA on all linear
layers, random tokens with the first half of every row masked from the loss, AdamW; one process, so both arms
share the same model, batch and warm caches. Prints the median step time of each arm and the ratio.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import statistics
import time


def _mallopt(keep: bool) -> None:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(-4, 0 if keep else 65536)  # M_MMAP_MAX (glibc's default 65536)
    mallopt(-1, 2**31 - 1 if keep else 128 * 1024)  # M_TRIM_THRESHOLD (default 128 KiB)
    if not keep:
        mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD back to its default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per arm")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers kept (SmolLM2 has 30)")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from tunesmith.model.fused_lora import FusedLoraMixin, use_fused_lora
    from tunesmith.model.resolve import resolve_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m-instruct"), dtype=torch.float32)
    model.model.layers = model.model.layers[: args.layers]
    model.config.num_hidden_layers = args.layers
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    use_fused_lora(model)
    fused = [m for m in model.modules() if isinstance(m, FusedLoraMixin)]
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    fused_class = type(fused[0])
    arms = {"peft, default malloc": (False, False), "fused, default malloc": (True, False),
            "peft, malloc keeps": (False, True), "fused, malloc keeps": (True, True)}
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in arms}
    for fuse, keep in arms.values():  # warm-up: one step each
        for module in fused:
            module.__class__ = fused_class if fuse else LoraLinear
        _mallopt(keep)
        step()
    for _ in range(args.steps):
        for name, (fuse, keep) in arms.items():
            for module in fused:
                module.__class__ = fused_class if fuse else LoraLinear
            _mallopt(keep)
            results[name].append(step())
    base = statistics.median(t for t, _ in results["peft, default malloc"])
    print(f"{args.layers} layers, {args.batch} × {args.seq} tokens, LoRA r{args.rank}, fp32, "
          f"{torch.get_num_threads()} threads, {args.steps} interleaved steps per arm")
    print(f"{'arm':<24}{'median step s':>14}{'faults/step':>13}{'speed vs peft+default':>23}")
    for name, values in results.items():
        median = statistics.median(t for t, _ in values)
        faults = int(statistics.median(f for _, f in values))
        print(f"{name:<24}{median:>14.2f}{faults:>13}{base / median:>22.2f}×")


if __name__ == "__main__":
    main()
