"""GPU training speed-ups, each selected by a key of the `hardware` node (conf/hardware/gpu.yaml); none is used on CPU.

- `attn_implementation: sdpa_varlen` (`register()`): padding-free attention. A padding-free batch is one row of
  several sequences laid end to end, with the sequence boundaries (`cu_seq_lens_q`, as TRL's collator gives them, or
  the restarts of `position_ids`). This attention runs it through PyTorch's own variable-length flash attention
  (`torch.nn.attention.varlen`, no flash-attn package needed), so no token attends across a boundary and no pad
  token is computed. Every other call (padded batches with a mask, generation with a KV cache) goes to transformers'
  sdpa unchanged, so the same model also generates and evaluates.
- `padding_free: true` (`padding_free_collator`): SFT batches are flattened into that one row instead of padded to the
  longest sample. The samples per step, the loss and its normalisation (mean over the batch's completion tokens) stay
  what they are with padding: it changes how the step computes, not what (hardware stays out of stage versions).
- `compile: true` (`compile_for_training`, SFT stages): `torch.compile` of each decoder layer for training (regional
  compilation: one graph reused by all layers, compiled once, no graph break at the LM head); `undo_for_training()`
  returns the plain modules for generation afterwards.
- `residual_dtype: bfloat16` (`bf16_residual_for_training`, SFT stages): with fp32 master weights under bf16 autocast,
  the embeddings' output is cast to bf16, so the residual stream between the layers is bf16, as FSDP's bf16 policy and
  bf16 weights have it. Autocast alone keeps it fp32 (neither the embedding lookup nor the residual adds are autocast
  ops), which doubles the bytes of every norm and add and of the activations kept for the backward: the SFT benchmark
  ran 13-22% slower and held 2 GB more on an H100 (benchmarks/README.md, the thirteenth lease). The matmuls are bf16
  either way; the weights, their gradients and AdamW stay fp32.
- `liger_kernels: true`: Liger's Triton RMSNorm, SwiGLU and RoPE (TRL `use_liger_kernel`) for the trainers that are not
  compiled (GRPO, reward models: they also generate or score with the model). The LM head and loss are TRL's own fused,
  chunked head either way.
- `varlen_kernel: auto` (`resolve_varlen_kernel`, with configure_attention): the padding-free attention runs
  FlashAttention's CuTe-DSL kernels (FA3-class, `fa_cute_fn`) on a Hopper GPU where vLLM ships them, else PyTorch's.
- `cudnn_attention: false` (`configure_attention`, every training stage): PyTorch's SDPA may not pick cuDNN's attention
  kernels. Their backward returns NaN gradients for padded batches of some lengths (below); padded batches then run
  the memory-efficient kernel, padding-free ones flash attention as before.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Mapping

import torch

from stages.shared.errors import UserError
from stages.shared.hardware import on_cpu

log = logging.getLogger(__name__)

VARLEN = "sdpa_varlen"
_registered = False
_cu_cache: dict = {}
_residual_hooks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its residual cast's handle
VARLEN_KERNELS = ("auto", "torch", "fa_cute")
_varlen_kernel = "torch"  # hardware.varlen_kernel as configure_attention resolved it for this process


@functools.cache  # called by every layer's forward: the import and the signature are read once
def varlen_fn():
    """torch.nn.attention.varlen.varlen_attn adapted to the signature of the installed torch (2.10: is_causal=True;
    2.11+: window_size=(-1, 0); GQA natively where it takes enable_gqa), or None where it does not exist."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params

    def attend(q, k, v, cu, max_len, scale):
        if q.shape[1] != k.shape[1]:
            if gqa:
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, enable_gqa=True, **causal)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)

    return attend


def varlen_kernel_op(namespace: str, forward, backward, device_type: str = "cuda"):
    """A varlen attention function (varlen_fn's signature) over a forward and a backward kernel with FlashAttention's
    arguments, `forward(q, k, v, cu, max_len, scale) -> (out, lse)` and `backward(q, k, v, out, dout, lse, cu,
    max_len, scale) -> (dq, dk, dv)`, as torch custom ops `namespace::fwd` / `namespace::bwd` with an autograd
    formula, so the per-layer torch.compile traces through them instead of breaking its graph."""

    @torch.library.custom_op(f"{namespace}::fwd", mutates_args=(), device_types=device_type)
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(q, k, v, cu, max_len, scale)

    @fwd.register_fake
    def _(q, k, v, cu, max_len, scale):
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        return out, q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)  # lse: (heads, tokens)

    @torch.library.custom_op(f"{namespace}::bwd", mutates_args=(), device_types=device_type)
    def bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
            lse: torch.Tensor, cu: torch.Tensor, max_len: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward(q, k, v, out, dout, lse, cu, max_len, scale)

    @bwd.register_fake
    def _(q, k, v, out, dout, lse, cu, max_len, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, cu, max_len, scale = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], cu)
        ctx.max_len, ctx.scale = max_len, scale

    def backward_formula(ctx, dout, dlse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        return (*bwd(q, k, v, out, dout.contiguous(), lse, cu, ctx.max_len, ctx.scale), None, None, None)

    fwd.register_autograd(backward_formula, setup_context=setup_context)

    def attend(q, k, v, cu, max_len, scale):
        return fwd(q, k, v, cu, max_len, q.shape[-1] ** -0.5 if scale is None else float(scale))[0]

    return attend


@functools.cache
def fa_cute_fn():
    """FlashAttention's CuTe-DSL kernels for packed (T, H, D) rows, forward and backward, causal, GQA natively:
    FA3-class on Hopper (sm90), where the SFT benchmark's GPU work was 5% less than with PyTorch's FA2-class kernel and
    the step 3.4% faster (their per-call Python then keeps the GPU waiting; benchmarks/README.md, the thirteenth
    lease). vLLM (0.25) ships them as vllm.vllm_flash_attn.cute; they need nvidia-cutlass-dsl (a vLLM dependency) and
    quack-kernels. None where they do not import. The interface's forward/backward are what its own autograd Function
    calls, wrapped here so torch.compile can trace them."""
    try:
        from vllm.vllm_flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except Exception as e:  # not installed, or the DSL does not load
        log.debug("FlashAttention CuTe-DSL kernels unavailable: %s: %s", type(e).__name__, e)
        return None

    def forward(q, k, v, cu, max_len, scale):
        return _flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                               softmax_scale=scale, causal=True, return_lse=True)

    def backward(q, k, v, out, dout, lse, cu, max_len, scale):
        return _flash_attn_bwd(q, k, v, out, dout, lse, scale, True, 0.0, cu_seqlens_q=cu, cu_seqlens_k=cu,
                               max_seqlen_q=max_len, max_seqlen_k=max_len)

    return varlen_kernel_op("r1flow_fa_cute", forward, backward)


def resolve_varlen_kernel(hardware: Mapping) -> str:
    """hardware.varlen_kernel: the kernel of the padding-free attention. `fa_cute` (fa_cute_fn) or `torch` (PyTorch's
    varlen flash kernel); `auto`: fa_cute on a Hopper GPU where it imports, else torch. UserError for fa_cute where it
    cannot run."""
    choice = str(hardware["varlen_kernel"])
    if choice not in VARLEN_KERNELS:
        raise UserError(f"hardware.varlen_kernel={choice!r}: use one of {', '.join(VARLEN_KERNELS)}")
    if choice == "torch" or on_cpu(hardware):
        return "torch"
    importable = fa_cute_fn() is not None
    hopper = importable and torch.cuda.get_device_capability()[0] == 9
    if hopper:
        return "fa_cute"
    if choice == "fa_cute":
        raise UserError("hardware.varlen_kernel=fa_cute: FlashAttention's CuTe-DSL kernels need a Hopper GPU (sm90) "
                        "and vllm.vllm_flash_attn.cute with its dependencies (pip install vllm nvidia-cutlass-dsl "
                        f"quack-kernels); {'this GPU is not sm90' if importable else 'they do not import here'}. "
                        "Fix: hardware.varlen_kernel=auto (or torch)")
    return "torch"


def _segments(kwargs: dict, q_len: int):
    """(cu_seq_lens int32 on the device, max length) of a one-row padding-free batch, or None for a single sequence.

    TRL's collator passes cu_seq_lens_q / max_length_q (computed on the CPU: no device sync). Without them the
    boundaries are read off position_ids (a restart at 0 begins a sequence), once per forward, not once per layer."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        return (cu if cu.dtype == torch.int32 else cu.to(torch.int32)), int(max_len)
    pos = kwargs.get("position_ids")
    if pos is None or pos.shape[-1] != q_len:
        return None
    key = (pos.data_ptr(), tuple(pos.shape), pos._version)
    if key not in _cu_cache:
        _cu_cache.clear()
        starts = (pos.reshape(-1) == 0).nonzero().flatten()
        if starts.numel() <= 1:
            _cu_cache[key] = None
        else:
            cu = torch.cat([starts, starts.new_tensor([q_len])]).to(torch.int32)
            _cu_cache[key] = (cu, int((cu[1:] - cu[:-1]).max()))
    return _cu_cache[key]


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers attention interface: varlen flash attention for a one-row padding-free batch, sdpa otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    if attention_mask is None and query.shape[0] == 1 and q_len > 1 and key.shape[2] == q_len:
        seg = _segments(kwargs, q_len)
        if seg is not None:
            attend = (fa_cute_fn() if _varlen_kernel == "fa_cute" else varlen_fn()) \
                if query.is_cuda and dropout == 0.0 else None
            low = _flash_dtype(query.dtype)
            if attend is not None and low is not None:
                cu, max_len = seg
                # (1, H, T, D) -> (T, H, D): the projections were laid out (T, H, D), so this is a view
                q, k, v = (t[0].transpose(0, 1).contiguous().to(low) for t in (query, key, value))
                return attend(q, k, v, cu, max_len, scaling).unsqueeze(0), None
            # CPU, or fp32 without autocast: a dense block mask, still correct
            attention_mask = _block_causal_mask(seg[0], q_len, query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _flash_dtype(dtype: torch.dtype):
    """The dtype flash attention runs in: the tensors' own if half precision; under CUDA autocast (fp32 weights, bf16
    compute: a model the base stage builds) the autocast dtype, as sdpa does; None for plain fp32."""
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    if torch.is_autocast_enabled("cuda"):
        low = torch.get_autocast_dtype("cuda")
        return low if low in (torch.float16, torch.bfloat16) else None
    return None


def _block_causal_mask(cu: torch.Tensor, length: int, device) -> torch.Tensor:
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), (cu[1:] - cu[:-1]).to(device).long())
    pos = torch.arange(length, device=device)
    return ((seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]


def _varlen_mask(*args, **kwargs):
    """No 4D mask where there is no padding mask: the attention keeps packed sequences apart itself (sdpa's mask for
    a packed row would be a dense T x T tensor). With a padding mask, sdpa's mask."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Make `sdpa_varlen` a transformers attention implementation (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(VARLEN, varlen_sdpa_attention)
        AttentionMaskInterface.register(VARLEN, _varlen_mask)
        _registered = True
    return VARLEN


def varlen_available() -> bool:
    return torch.cuda.is_available() and varlen_fn() is not None


def set_attention(model, name: str | None) -> str:
    """Switch model to attention `name` (sdpa_varlen is registered first and falls back to sdpa where PyTorch has no
    varlen flash attention); returns the implementation in use."""
    if not name:
        return model.config._attn_implementation
    if name == VARLEN:
        register()
        if not varlen_available():
            name = "sdpa"
    if getattr(model.config, "_attn_implementation", None) != name:
        try:
            model.set_attn_implementation(name)
        except (ValueError, ImportError) as e:  # e.g. flash_attention_2 without the package: keep what loaded
            log.info(f"attn_implementation={name} not available ({e}); using {model.config._attn_implementation}")
    return model.config._attn_implementation


def padding_free_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """TRL's collator in padding-free mode: the batch's samples end to end in one row, with position_ids and
    cu_seq_lens for the varlen attention; labels at each sequence start masked (nothing predicts across a boundary)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log.info("padding-free batches; their attention: %s", "FlashAttention's CuTe-DSL kernels"
             if _varlen_kernel == "fa_cute" else "PyTorch's varlen flash kernel")
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True, pad_to_multiple_of=pad_to_multiple_of)


def use_padding_free(hardware: Mapping, model=None) -> bool:
    """Padding-free batches need an attention that keeps the sequences of a row apart: sdpa_varlen or flash."""
    if not hardware["padding_free"] or on_cpu(hardware):
        return False
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None) if model is not None else \
        hardware["attn_implementation"]
    return attn in (VARLEN, "flash_attention_2", "flash_attention_3", "flex_attention")


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger(model) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE on model in place (what TRL's use_liger_kernel applies at trainer start)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def compile_for_training(model, hardware: Mapping) -> bool:
    """hardware.compile: true / "layers" compiles each decoder layer (regional: one graph for all of them, compiled
    once), "backbone" the whole decoder stack as one graph. The LM head stays TRL's fused, chunked head. Returns
    whether anything was compiled (on CPU never)."""
    mode = hardware["compile"]
    if not mode or on_cpu(hardware):
        return False
    if mode is True or mode == "layers":
        for layer in _decoder_layers(model):
            layer.compile()
    elif mode == "backbone":
        _backbone(model).compile()
    else:
        raise ValueError(f"hardware.compile={mode!r}: use false, true (= layers), layers or backbone")
    return True


def bf16_residual_for_training(model, hardware: Mapping) -> bool:
    """hardware.residual_dtype: bfloat16 casts the input embeddings' output to the autocast dtype while autocast is on
    (training); float32 leaves autocast's fp32 residual stream. Returns whether the cast was added (on CPU never).
    Outside autocast (generation, evaluation) the hook passes the output through; `undo_for_training` removes it."""
    dtype = str(hardware["residual_dtype"])
    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"hardware.residual_dtype={dtype!r}: use bfloat16 (the residual stream in bf16 under bf16 "
                        f"autocast) or float32 (as autocast leaves it)")
    if dtype == "float32" or on_cpu(hardware):
        return False

    def cast(module, args, output):
        kind = output.device.type
        if torch.is_autocast_enabled(kind) and output.dtype == torch.float32:
            return output.to(torch.get_autocast_dtype(kind))
        return None

    _residual_hooks[model] = model.get_input_embeddings().register_forward_hook(cast)
    return True


def undo_for_training(model):
    """Undo compile_for_training and bf16_residual_for_training: generation and saving after training run the plain
    modules (and a reference model compared with this one sees the same numerics)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    hook = _residual_hooks.pop(model, None)
    if hook is not None:
        hook.remove()
    return model


def configure_attention(hardware: Mapping) -> bool:
    """hardware.cudnn_attention (default false): whether SDPA may use cuDNN attention; returns it (False on CPU).

    cuDNN's SDPA backward (torch 2.11+, H100/H200, the kernel SDPA picks by default there) returns NaN in dQ when an
    explicit attention mask is passed, the sequence length is 64 mod 128 and some query row's logsumexp is below
    ln(FLT_MAX) = -88.7, which a fully masked row (a left-padding position) always is: pytorch/pytorch#196678,
    huggingface/trl#7181. GRPO's batches (left-padded prompts + completions) hit it: on the lent H100 reasoning_grpo
    (and merged_sft_alignment's RL before it) got a NaN gradient norm mid-run, with bf16 and with fp32 master weights
    alike, and autograd's anomaly mode named ScaledDotProductCudnnAttentionBackward0; benchmarks/cudnn_sdpa_nan.py
    reduces it to one padded forward/backward, NaN at lengths 64 and 192 with cuDNN, none without
    (benchmarks/README.md)."""
    global _varlen_kernel
    _varlen_kernel = resolve_varlen_kernel(hardware)
    if on_cpu(hardware):
        return False
    allowed = bool(hardware["cudnn_attention"])
    torch.backends.cuda.enable_cudnn_sdp(allowed)
    return allowed


def _backbone(model):
    base = getattr(model, "get_base_model", lambda: model)()
    return getattr(base, "model", base)


def _decoder_layers(model):
    base = getattr(model, "get_base_model", lambda: model)()
    layers = getattr(_backbone(model), "layers", None)
    if layers is None:
        raise ValueError(f"hardware.compile: cannot find the decoder layers of {type(base).__name__}")
    return list(layers)
