"""GPU check of the variable-length attention path: one varlen flash-attention call equals the per-sample SDPA loop
(outputs and gradients), for packed rows with right padding and one-token samples, GQA, a sliding window, in bf16
and fp16; both against a float32 loop as the reference (run: PYTHONPATH=src python bench/gpu_varlen_check.py)."""

from __future__ import annotations

import sys

import torch

from tunesmith.data.pack import row_segments
from tunesmith.model.segment_attention import segment_runs, segment_sdpa
from tunesmith.model.varlen_attention import varlen_kernel, varlen_segments, varlen_usable


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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
