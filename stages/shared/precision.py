"""fp32 master weights kept by the optimizer while the model trains in bf16 (`hardware.master_weights: optimizer`).

Mixed precision keeps an fp32 copy of every weight, which AdamW updates, and runs the forward and backward in bf16
(Micikevicius et al. 2018). `hardware.master_weights` says where that copy lives during an SFT stage:

- `model`: the model's own weights are fp32 and autocast casts them to bf16 op by op. The activations between the
  autocast ops stay fp32 wherever an fp32 weight meets them (every RMSNorm's scale promotes its output to fp32), so
  the fused elementwise work moves twice the bytes: on an H100 the SFT benchmark's GPU work per step was 206 ms
  against 196 ms with `optimizer`, and the step 3% slower (benchmarks/README.md, the fourteenth lease).
- `optimizer` (one GPU): the model trains on bf16 weights and `MasterWeightsAdamW` keeps the fp32 ones, as
  Megatron-LM and DeepSpeed's bf16 mode do: each step takes the bf16 gradients in fp32, updates the fp32 masters and
  writes them back rounded to bf16. Updates smaller than a bf16 weight's last bit accumulate in the master instead of
  being rounded away (what `hardware.weights_dtype: bfloat16`, pure bf16, does). With gradient accumulation the
  micro-batches' gradients are summed in fp32 and rounded once. After training `restore_master_weights` puts the fp32
  weights back into the model, so what is saved, and what the next stage loads, is fp32 as with `model`.

Under FSDP (hardware=multi_gpu) FSDP keeps fp32 shards and computes on bf16 copies itself: this module stays out.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch.utils.weak import WeakIdKeyDictionary

from stages.shared.errors import UserError
from stages.shared.hardware import on_cpu

log = logging.getLogger(__name__)

MASTER_WEIGHTS = ("optimizer", "model")
_masters = WeakIdKeyDictionary()  # bf16 parameter -> its fp32 master, while it trains


def bf16_weights_for_training(model, hardware: Mapping, *, sharded: bool = False) -> dict:
    """hardware.master_weights: `optimizer` casts the model's fp32 parameters to bf16 in place and returns
    {parameter: its fp32 weights} (the masters `MasterWeightsAdamW` takes over); `model` returns {} and leaves them.
    Also {} on CPU, without bf16, under FSDP (`sharded`) and where no parameter is fp32 (weights_dtype=bfloat16)."""
    choice = str(hardware["master_weights"])
    if choice not in MASTER_WEIGHTS:
        raise UserError(f"hardware.master_weights={choice!r}: use optimizer (bf16 weights in the model, fp32 master "
                        f"weights in the optimizer) or model (fp32 weights in the model, bf16 by autocast)")
    if choice == "model" or on_cpu(hardware) or not hardware["bf16"] or sharded:
        return {}
    for param in model.parameters():
        if param.dtype == torch.float32:
            _masters[param] = param.data
            param.data = param.data.to(torch.bfloat16)
    masters = master_weights(model)
    if masters:
        log.info("training on bf16 weights, their fp32 masters in the optimizer (hardware.master_weights=optimizer)")
    return masters


def master_weights(model) -> dict:
    """{parameter: fp32 master} of the model's parameters that train under `bf16_weights_for_training` (also through
    a peft wrapper around the model), else {}."""
    return {p: _masters[p] for p in model.parameters() if p in _masters}


def restore_master_weights(model) -> None:
    """The fp32 master weights back into the model after its last optimizer step (the optimizer has been writing their
    bf16 rounding into it), so the final checkpoint, generation, the saved artifact and the next stage see the trained
    fp32 weights. Each parameter gets its own copy, on its device (safetensors refuses to save parameters that share
    the optimizer's flat buffer). Nothing for a model without masters."""
    for param in model.parameters():
        master = _masters.pop(param, None)
        if master is not None:
            param.data = master.to(param.device, copy=True)


def master_weights_optimizer(args, masters: dict) -> tuple[type, dict] | None:
    """The Trainer's `optimizer_cls_and_kwargs` when `masters` (bf16_weights_for_training) is not empty:
    MasterWeightsAdamW with the AdamW settings args.optim gives (lr, betas, eps, fused); else None. The masters
    themselves are looked up by parameter, so the kwargs, which the Trainer keeps, hold no tensor."""
    if not masters:
        return None
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if cls is not torch.optim.AdamW:
        optim = getattr(args.optim, "value", args.optim)
        raise UserError(f"hardware.master_weights=optimizer keeps fp32 masters for PyTorch's AdamW (hardware.optim: "
                        f"adamw_torch or adamw_torch_fused), not hardware.optim={optim}: change hardware.optim or "
                        f"set hardware.master_weights=model")
    return MasterWeightsAdamW, {**kwargs, "accumulation_steps": int(args.gradient_accumulation_steps)}


class MasterWeightsAdamW(torch.optim.AdamW):
    """AdamW over the fp32 masters of bf16 parameters (bf16_weights_for_training; a parameter without one, i.e. one
    that was fp32 at that point or was added later, is its own master). The masters of each parameter group are one
    flat fp32 tensor: AdamW is elementwise, so the update is the same, and one step costs a few large kernels instead of
    several per parameter (on the SFT benchmark per-parameter casts and copies cost ~6 ms of host and ~5 ms of GPU per
    step).

    The Trainer clips the bf16 gradients and calls step(): they are concatenated and taken in fp32, AdamW updates the
    masters, and their bf16 rounding is copied into the parameters. A parameter without a gradient (unused in the
    forward) contributes zeros, where per-parameter AdamW would skip it. The masters are part of state_dict(), so a
    resumed run continues from them, not from the bf16 checkpoint."""

    def __init__(self, params, *, accumulation_steps: int = 1, **kwargs):
        groups = [dict(g) for g in params] if isinstance(params, (list, tuple)) and params \
            and isinstance(params[0], dict) else [{"params": list(params)}]
        self.model_params = [list(g["params"]) for g in groups]
        self._flat = []  # per group with masters: (its bf16 parameters, their flat fp32 masters, a bf16 staging copy)
        optimized = []
        for group, params in zip(groups, self.model_params):
            cast = [p for p in params if p in _masters]
            own = [p for p in params if p not in _masters]
            if cast:
                # where the parameters are now: a model built on the CPU (base) was cast there, then moved to the GPU
                # by the Trainer
                flat = torch.cat([_masters[p].reshape(-1).to(p.device) for p in cast])
                for p, view in zip(cast, flat.split([p.numel() for p in cast])):
                    _masters[p] = view.view_as(p)  # the fp32 tensor it was cast from is freed
                staging = torch.empty_like(flat, dtype=torch.bfloat16)
                views = [v.view_as(p) for p, v in zip(cast, staging.split([p.numel() for p in cast]))]
                self._flat.append((cast, flat, staging, views))
                own = [*own, flat]
            optimized.append({**group, "params": own})
        super().__init__(optimized, **kwargs)
        self._sums: dict = {}
        if accumulation_steps > 1:
            for cast, *_ in self._flat:
                for param in cast:
                    if param.requires_grad:
                        param.register_post_accumulate_grad_hook(self._accumulate)

    def _accumulate(self, param) -> None:
        """After each micro-batch's backward (gradient accumulation): the gradient is added to an fp32 sum and
        dropped; on the last micro-batch (accelerate's sync_gradients, which the Trainer sets) the sum is added to that
        micro-batch's gradient, which rounds the whole sum to bf16 once, for the Trainer to clip."""
        from accelerate.state import GradientState

        total = self._sums.pop(param, None)
        if GradientState().sync_gradients:
            if total is not None:
                param.grad.add_(total)
            return
        self._sums[param] = param.grad.float() if total is None else total.add_(param.grad)
        param.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        for cast, flat, _, _ in self._flat:
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in cast]
            flat.grad = torch.cat(grads).float()
        loss = super().step(closure)
        for cast, flat, staging, views in self._flat:
            staging.copy_(flat)
            torch._foreach_copy_(cast, views)
            flat.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for params in self.model_params:
            for param in params:
                param.grad = None

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [flat for _, flat, _, _ in self._flat]
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        sizes = [flat.numel() for _, flat, _, _ in self._flat]
        if saved is None or [t.numel() for t in saved] != sizes:
            raise ValueError(f"the optimizer state holds fp32 master weights of sizes "
                             f"{None if saved is None else [t.numel() for t in saved]}, this model's are {sizes}: it "
                             f"was saved with another hardware.master_weights or model; resume with the setting it "
                             f"was saved with")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for (cast, flat, staging, views), value in zip(self._flat, saved):
                flat.copy_(value)
                staging.copy_(flat)
                torch._foreach_copy_(cast, views)
