"""The NaN of the GPU runs, reduced: one training forward/backward of a random-init Qwen3 of random_300m's shape on a
left-padded batch (as GRPO's prompt + completion batches are), through transformers' sdpa attention, with PyTorch's
cuDNN attention allowed (its default) and not (hardware.cudnn_attention=false, stages/gpu.configure_attention).

    python benchmarks/cudnn_sdpa_nan.py

Prints, per total sequence length, the number of parameter tensors whose gradient is not finite. pytorch#196678:
cuDNN's SDPA backward gives NaN dQ when a mask is passed, the length is 64 mod 128 and a row's logsumexp is below
-88.7 (a fully masked left-padding row).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from transformers import AutoModelForCausalLM, Qwen3Config

    from pipeline.plan import compose_config
    from stages.shared import attention

    arch = dict(compose_config(["model=random_300m"]).base.model.architecture)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**arch, vocab_size=512), dtype=torch.float32).cuda()
    model.set_attn_implementation("sdpa")
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    print(f"{'length':>6} {'cudnn':>6} {'weights':>8} {'non-finite grads':>17} {'loss':>8}")
    failures = {}
    for length in (63, 64, 65, 128, 192, 200):
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(3, 512, (8, length), generator=g)
        mask = torch.ones_like(ids)
        for row, pad in enumerate((0, 1, 3, 5, 7, 9, 11, 13)):  # left padding, as GRPO's prompts
            mask[row, :pad] = 0
            ids[row, :pad] = 2
        labels = ids.masked_fill(mask == 0, -100)
        for cudnn in (True, False):
            for weights in ("float32", "bfloat16"):
                attention.configure_attention({"device": "cuda", "cudnn_attention": cudnn})
                model.to(getattr(torch, weights))
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()).loss
                loss.backward()
                bad = sum(not torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
                failures[(length, cudnn, weights)] = bad
                print(f"{length:>6} {str(cudnn):>6} {weights:>8} {bad:>17} {loss.item():>8.4f}", flush=True)
    attention.configure_attention({"device": "cuda", "cudnn_attention": False})
    clean = all(v == 0 for (length, cudnn, _), v in failures.items() if not cudnn)
    print(f"without cuDNN attention: {'no' if clean else 'SOME'} non-finite gradients; with it: "
          f"{sorted({k[0] for k, v in failures.items() if k[1] and v})} lengths gave NaN")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
