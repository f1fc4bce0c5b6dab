"""GPU check of the variable-length attention path: one varlen flash-attention call equals the per-sample SDPA loop
(outputs and gradients), for packed rows with right padding and one-token samples, GQA, a sliding window, in bf16
and fp16; both against a float32 loop as the reference. Then the same call inside torch.compile (inductor, dynamic
shapes) with the batch's offsets as inputs, as compiled decoder blocks make it: equal to the eager call, one graph
for batches of other widths and samples, no graph break (run: PYTHONPATH=src python bench/gpu_varlen_check.py)."""

from __future__ import annotations

import sys

import torch

from tunesmith.data.pack import row_segments, sequence_offsets
from tunesmith.model.segment_attention import segment_runs, segment_sdpa
from tunesmith.model.varlen_attention import varlen_attend, varlen_kernel, varlen_segments, varlen_usable


def grads(fn, tensors: list[torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(upstream.to(out.dtype))
    return out.detach().float(), [leaf.grad.float() for leaf in leaves]


def main() -> int:
    if varlen_kernel() is None or not torch.cuda.is_available():
        print("varlen: this torch has no torch.nn.attention.varlen, or there is no CUDA device")
        return 1
    torch.manual_seed(0)
    seq_lens = [[300, 1, 700, 45], [1024], [5, 512, 2, 1]]  # rows of 1,100 tokens, right-padded
    width = 1100
    runs = segment_runs(row_segments(seq_lens, width))
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for heads, kv_heads, window in ((14, 2, None), (8, 8, None), (8, 2, 128)):
            q = torch.randn(len(seq_lens), heads, width, 64, device="cuda")
            k = torch.randn(len(seq_lens), kv_heads, width, 64, device="cuda")
            v = torch.randn(len(seq_lens), kv_heads, width, 64, device="cuda")
            upstream = torch.randn(len(seq_lens), heads, width, 64, device="cuda")
            assert varlen_usable(q.to(dtype), 0.0)

            def loop(q, k, v, window=window):
                return segment_sdpa(q, k, v, runs, scaling=0.125, sliding_window=window)

            def varlen(q, k, v, window=window):
                return varlen_segments(q, k, v, runs, scaling=0.125, sliding_window=window)

            ref, ref_grads = grads(loop, [q, k, v], upstream)
            low = [x.to(dtype) for x in (q, k, v)]
            loop_out, loop_grads = grads(loop, low, upstream)
            var_out, var_grads = grads(varlen, low, upstream)
            scale = max(ref.abs().max().item(), 1e-6)
            loop_err = (loop_out - ref).abs().max().item() / scale
            var_err = (var_out - ref).abs().max().item() / scale
            var_vs_loop = (var_out - loop_out).abs().max().item() / scale
            grad_err = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
                           for a, b in zip(var_grads, ref_grads, strict=True))
            loop_grad_err = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
                                for a, b in zip(loop_grads, ref_grads, strict=True))
            worst = max(worst, var_err - 2 * loop_err, grad_err - 2 * loop_grad_err)
            print(f"{str(dtype):15} heads {heads:>2}/{kv_heads:<2} window {window!s:>4}: vs float32 loop "
                  f"out {var_err:.1e} (loop {loop_err:.1e}), grads {grad_err:.1e} (loop {loop_grad_err:.1e}); "
                  f"varlen vs loop {var_vs_loop:.1e}")
    ok = worst <= 1e-2
    print("varlen check:", "equal to the loop within its own rounding" if ok else f"DIFFERS ({worst:.2e})")
    return 0 if ok and compiled_check() else 1


def compiled_check() -> bool:
    """The varlen call compiled with the offsets as inputs equals it eagerly, for three differently packed
    batches, in one graph and without a graph break."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(varlen_attend, dynamic=True)
    worst = 0.0
    for seq_lens, width in (([[300, 1, 700, 45], [1024], [5, 512, 2, 1]], 1100),
                            ([[90, 900], [17, 33, 640], [800], [3, 4]], 1000), ([[1200, 6], [70]], 1210)):
        offsets, longest = sequence_offsets(row_segments(seq_lens, width).cuda())
        shape = (len(seq_lens), width, 64)
        q, k, v = (torch.randn(shape[0], h, *shape[1:], device="cuda", dtype=torch.bfloat16) for h in (14, 2, 2))
        upstream = torch.randn_like(q)
        bounds = (offsets, longest, 0.125)
        eager_out, eager_grads = grads(lambda *x, b=bounds: varlen_attend(*x, *b), [q, k, v], upstream)
        out, out_grads = grads(lambda *x, b=bounds: compiled(*x, *b), [q, k, v], upstream)
        for a, b in zip([out, *out_grads], [eager_out, *eager_grads], strict=True):
            worst = max(worst, (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    ok = worst <= 1e-2 and graphs == 1 and not breaks
    print(f"compiled varlen: vs eager {worst:.1e} (outputs and grads), {graphs} graph(s) for 3 batches, "
          f"{breaks} graph break(s):", "ok" if ok else "FAILS")
    return ok


if __name__ == "__main__":
    sys.exit(main())
