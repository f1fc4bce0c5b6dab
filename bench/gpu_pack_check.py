"""GPU check of packing: a packed bf16/fp32 batch on CUDA (SDPA and eager) gives finite logits and the same
loss as its samples one by one (run: PYTHONPATH=src python bench/gpu_pack_check.py)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tunesmith.data.loader import collate
from tunesmith.data.pack import pack_samples


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # tunesmith.train.loop's, copied: importing the loop needs pydantic, which the GPU box may lack
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    return torch.nn.functional.cross_entropy(
        logits.float().view(-1, logits.size(-1)), shift.reshape(-1), ignore_index=-100, reduction="sum"
    )


class Enc:
    def __init__(self, ids: list[int], labels: list[int]) -> None:
        self.input_ids, self.labels = ids, labels


def main() -> None:
    torch.manual_seed(0)
    samples = []
    for n in (37, 55, 20, 61, 12, 44):
        ids = torch.randint(3, 400, (n,)).tolist()
        samples.append(Enc(ids, [-100] * (n // 2) + ids[n // 2 :]))
    rows, _ = pack_samples(samples, 128)
    cfg = Qwen2Config(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for attn in ("sdpa", "eager"):
        for dtype in (torch.float32, torch.bfloat16):
            cfg._attn_implementation = attn
            model = Qwen2ForCausalLM(cfg).cuda().to(dtype)
            with torch.no_grad():
                packed = collate(rows, 0).to("cuda")
                lp = token_loss_sum(model(**packed.model_inputs(), use_cache=False).logits, packed.labels)
                ls = sum(
                    float(token_loss_sum(model(**b.model_inputs(), use_cache=False).logits, b.labels))
                    for b in (collate([s], 0).to("cuda") for s in samples)
                )
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    la = token_loss_sum(
                        model.float()(**packed.model_inputs(), use_cache=False).logits, packed.labels
                    )
            print(
                f"{attn:6} {str(dtype):15} packed={float(lp):.5f} single={ls:.5f} "
                f"rel={abs(float(lp) - ls) / ls:.2e} autocast_bf16={float(la):.5f} finite={bool(torch.isfinite(lp))}"
            )


if __name__ == "__main__":
    main()
