"""SFT throughput on one GPU: the project's SFT path (hardware=gpu) against plain TRL defaults, same model and data.

The shape is ../shared/bench/gpu_sft_anchor.py's: a random-init Qwen3 of 0.37B parameters (hidden 1024, 24 layers,
16 heads / 8 KV heads of 64, MLP 3072, vocab 32k, untied), bf16 weights, 2048 pre-tokenized samples of random length
128..2048. Tokens/s counts real (non-pad) tokens over timed steps (after warm-up, CUDA-synchronised); MFU is
6 * N * tokens/s over the bf16 matmul rate measured in the same process (N = all parameters, as the anchor counts).

    python benchmarks/bench_sft_gpu.py             # project: TRL defaults vs stages.shared.trainers.sft with hardware=gpu
    python benchmarks/bench_sft_gpu.py explore     # the variants that chose conf/hardware/gpu.yaml's settings
    python benchmarks/bench_sft_gpu.py explore pf_b32 raw_compile_b32   # some of them
    python benchmarks/bench_sft_gpu.py project trl_defaults project_b32 project_b32_backbone  # named variants
    python benchmarks/bench_sft_gpu.py grpo        # reasoning_grpo's run() on random_300m: generation/training split
    python benchmarks/bench_sft_gpu.py kernels     # varlen attention kernels against flash: FA CuTe-DSL, cuDNN
    python benchmarks/bench_sft_gpu.py kernels fa_cute   # one of them

`project` runs exactly what cold_start_sft runs (stages.shared.trainers.load_policy + stages.shared.trainers.sft on the stage's
composed config with hardware=gpu); only the data (random tokens) and the step budget are the benchmark's. Results go
to stdout (a table last) and, with $OUT set, to $OUT/bench_sft_gpu.json and per-variant profiler tables.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 32000
N_ROWS = 2048
WARM = 6          # steps before timing (compilation, allocator warm-up)
TIMED = 20
PROFILED = 3      # steps under torch.profiler after the timed ones (profile=True)
SYNC_DEBUG_STEP = 4  # the warm-up step whose host syncs are listed (sync_debug=True), after compilation
OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench_sft_"))


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t1", pad_token="t2")


def model_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=VOCAB, hidden_size=1024, intermediate_size=3072, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False,
                       max_position_embeddings=4096, eos_token_id=1, pad_token_id=2, bos_token_id=1)


def build_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(), dtype=torch.bfloat16)


def data(n=N_ROWS, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(128, 2049, (n,), generator=g).tolist()
    return Dataset.from_list([{"input_ids": torch.randint(3, VOCAB, (L,), generator=g).tolist()} for L in lens])


def ceiling():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 / ((time.perf_counter() - t) / 10)


# ---------------------------------------------------------------------------------------------------------------------
# Timing, token counting and profiling around a Trainer

def _count_tokens(inputs) -> int:
    am = inputs.get("attention_mask")
    return int(am.sum()) if am is not None else int(inputs["input_ids"].numel())


class Meter:
    """Times steps [WARM, WARM+TIMED) with CUDA syncs and counts their real tokens; profiles PROFILED steps after."""

    def __init__(self, name, profile=False, sync_debug=False):
        self.name, self.profile, self.sync_debug = name, profile, sync_debug
        self.tokens = 0
        self.step_tokens: list[int] = []  # the timed steps' token counts: how even the batches are
        self.t0 = self.dt = None
        self.prof = None

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if meter.sync_debug and state.global_step == SYNC_DEBUG_STEP:
                    meter.start_sync_debug()
                if state.global_step == WARM:
                    torch.cuda.synchronize()
                    meter.t0 = time.perf_counter()
                if meter.profile and state.global_step == WARM + TIMED:
                    meter.start_profile()

            def on_step_end(self, args, state, control, **kw):
                if meter.sync_debug and state.global_step == SYNC_DEBUG_STEP + 1:
                    meter.stop_sync_debug()
                if state.global_step == WARM + TIMED:
                    torch.cuda.synchronize()
                    meter.dt = time.perf_counter() - meter.t0

            def on_train_end(self, args, state, control, **kw):
                meter.stop_profile(PROFILED)

        return _CB()

    def wrap(self, trainer):
        orig = trainer.training_step

        def step(model, inputs, *a, **k):
            if WARM <= trainer.state.global_step < WARM + TIMED:
                self.step_tokens.append(_count_tokens(inputs))
                self.tokens += self.step_tokens[-1]
            return orig(model, inputs, *a, **k)

        trainer.training_step = step

    def start_sync_debug(self):
        """Every host sync of one warm-up step, by call stack (torch.cuda.set_sync_debug_mode warns at each)."""
        import traceback
        import warnings

        self.syncs: dict[str, int] = {}
        self._showwarning = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" not in str(message):
                return self._showwarning(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-2] if "/warnings.py" not in f.filename][-7:]
            key = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
            self.syncs[key] = self.syncs.get(key, 0) + 1

        warnings.showwarning = show
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")

    def stop_sync_debug(self):
        import warnings

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._showwarning
        print(f"[{self.name}] host syncs in step {SYNC_DEBUG_STEP}: {sum(self.syncs.values())}", flush=True)
        for key, n in sorted(self.syncs.items(), key=lambda kv: -kv[1]):
            print(f"  {n:4d} x {key}", flush=True)

    def start_profile(self):
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.prof.__enter__()
        self.prof_t0 = time.perf_counter()

    def stop_profile(self, steps):
        if self.prof is None:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.prof_t0
        self.prof.__exit__(None, None, None)
        self.profile_summary = summarize_profile(self.prof, wall, steps, self.name)
        self.prof = None


def _kernel_class(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_", "cublas", "matmul", "wgmma")):
        return "matmul"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if "triton" in n:
        return "triton (fused)"
    if "nccl" in n:
        return "comm"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "other (eager elementwise/reduce)"


def summarize_profile(prof, wall, steps, name) -> dict:
    """GPU busy time over wall time per step, and the kernel time split by class; full table into $OUT."""
    classes: dict[str, float] = {}
    busy = 0.0
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = getattr(evt, "self_cuda_time_total", 0)
        if not dev or evt.key.startswith("ProfilerStep"):
            continue
        # only kernels and copies (device-side events) count, CPU ops carry device time of their children
        if getattr(evt, "device_type", None) is not None and "CUDA" not in str(evt.device_type):
            continue
        busy += dev
        cls = _kernel_class(evt.key)
        classes[cls] = classes.get(cls, 0.0) + dev
    busy_s = busy / 1e6
    gaps = idle_gaps(prof, name)
    try:  # one file per profiled variant: kernels by GPU time, ops by CPU time, the largest GPU idle gaps
        text = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
        text += "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40,
                                                     max_name_column_width=90)
        text += "\n\n" + json.dumps(gaps.pop("_all_largest", []), indent=1)
        (OUT / f"profile_{name}.txt").write_text(text)
    except Exception as e:  # pragma: no cover
        print("profile table:", e)
    out = {"wall_per_step_s": round(wall / steps, 4), "gpu_busy_per_step_s": round(busy_s / steps, 4),
           "gpu_busy_frac": round(busy_s / wall, 3),
           "kernel_split": {k: round(v / busy, 3) for k, v in sorted(classes.items(), key=lambda x: -x[1])},
           "idle": gaps}
    print(f"[{name}] profile: {json.dumps(out)}", flush=True)
    return out


def idle_gaps(prof, name, top=25) -> dict:
    """Where the GPU waits: the gaps between kernels, bucketed by length, and the largest ones with the CPU ops
    running at their midpoint (outermost and innermost), so a sync or a slow host step shows by name."""
    from torch.autograd import DeviceType

    evts = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in evts if e.device_type == DeviceType.CUDA)
    if not kernels:
        return {}
    gaps, end = [], kernels[0][1]
    for s, e in kernels[1:]:
        if s > end:
            gaps.append((end, s))
        end = max(end, e)
    buckets = {"<10us": 0.0, "10-100us": 0.0, "0.1-1ms": 0.0, ">1ms": 0.0}
    for a, b in gaps:
        d = b - a
        key = "<10us" if d < 10 else "10-100us" if d < 100 else "0.1-1ms" if d < 1000 else ">1ms"
        buckets[key] += d / 1e3
    cpu = [e for e in evts if e.device_type == DeviceType.CPU]
    largest = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        mid = (a + b) / 2
        cover = sorted((e for e in cpu if e.time_range.start <= mid <= e.time_range.end),
                       key=lambda e: e.time_range.end - e.time_range.start)
        largest.append({"ms": round((b - a) / 1e3, 2), "inner": cover[0].name if cover else "(python)",
                        "outer": cover[-1].name if cover else "(python)"})
    out = {"total_ms": round(sum(b - a for a, b in gaps) / 1e3, 1), "n": len(gaps),
           "ms_by_gap_size": {k: round(v, 1) for k, v in buckets.items()}, "largest": largest[:10]}
    out["_all_largest"] = largest
    return out


def _result(name, meter, n_params, peak, extra=None):
    tps = meter.tokens / meter.dt
    r = {"name": name, "params": n_params, "tokens_per_s": round(tps), "step_s": round(meter.dt / TIMED, 3),
         "tokens_per_step": round(meter.tokens / TIMED), "mfu": round(6 * n_params * tps / peak, 3),
         "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1),
         "tokens_per_step_min_max": [min(meter.step_tokens, default=0), max(meter.step_tokens, default=0)]}
    if getattr(meter, "profile_summary", None):
        r["profile"] = meter.profile_summary
    r.update(extra or {})
    return r


def _cleanup():
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------------
# Plain TRL (the anchor's way) and the explored variants

def run_trl(name, ds, peak, *, batch=8, attn=None, padding_free=False, liger=False, compile=False, profile=False,
            **sft_kwargs):
    from trl import SFTConfig, SFTTrainer

    from stages.shared import attention

    tok = tokenizer()
    m = build_model()
    n_params = sum(p.numel() for p in m.parameters())
    if attn:
        attention.set_attention(m, attn)
    if liger:
        attention.apply_liger(m)
    attention.compile_for_training(m, {"device": "cuda", "compile": compile})
    meter = Meter(name, profile)
    args = SFTConfig(output_dir=str(OUT / f"ckpt_{name}"), report_to=[], save_strategy="no", logging_steps=1000,
                     max_steps=WARM + TIMED + (PROFILED if profile else 0), learning_rate=1e-4, bf16=True,
                     max_length=2048, per_device_train_batch_size=batch, disable_tqdm=True, **sft_kwargs)
    collator = attention.padding_free_collator(tok) if padding_free else None
    tr = SFTTrainer(model=m, args=args, train_dataset=ds, processing_class=tok, data_collator=collator,
                    callbacks=[meter.callback()])
    meter.wrap(tr)
    tr.train()
    r = _result(name, meter, n_params, peak, {"attn": m.config._attn_implementation,
                                                "gc": bool(tr.args.gradient_checkpointing), "optim": str(tr.args.optim)})
    del tr, m
    return r


def run_raw(name, ds, peak, *, batch=32, compile=True, liger=False, profile=False):
    """No Trainer: the same model, collator, fused LM head and fused AdamW in a bare loop (what the Trainer costs)."""
    from trl.trainer.utils import add_fused_lm_head

    from stages.shared import attention

    tok = tokenizer()
    m = build_model().cuda()
    n_params = sum(p.numel() for p in m.parameters())
    attention.set_attention(m, attention.VARLEN)
    if liger:
        attention.apply_liger(m)
    attention.compile_for_training(m, {"device": "cuda", "compile": compile})
    add_fused_lm_head(m, outputs=("log_probs",))
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    collate = attention.padding_free_collator(tok)
    meter = Meter(name, profile)
    rows = ds.with_format(None)
    for step in range(WARM + TIMED + (PROFILED if profile else 0)):
        if step == WARM:
            torch.cuda.synchronize()
            meter.t0 = time.perf_counter()
        if profile and step == WARM + TIMED:
            meter.start_profile()
        batch_rows = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        inputs = {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in collate(batch_rows).items()}
        if WARM <= step < WARM + TIMED:
            meter.tokens += _count_tokens(inputs)
        loss = m(**inputs, fused_lm_head=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == WARM + TIMED - 1:
            torch.cuda.synchronize()
            meter.dt = time.perf_counter() - meter.t0
    meter.stop_profile(PROFILED)
    r = _result(name, meter, n_params, peak, {"attn": m.config._attn_implementation})
    del m, opt
    return r


EXPLORE = {
    # the anchor's baseline: TRL's defaults (gradient checkpointing on, padded batches, sdpa)
    "trl_defaults": lambda ds, pk: run_trl("trl_defaults", ds, pk, batch=8),
    # padding-free rows through varlen flash attention, no checkpointing, fused AdamW
    "pf_b8": lambda ds, pk: run_trl("pf_b8", ds, pk, batch=8, attn="sdpa_varlen", padding_free=True,
                                    gradient_checkpointing=False, optim="adamw_torch_fused"),
    "pf_b32": lambda ds, pk: run_trl("pf_b32", ds, pk, batch=32, attn="sdpa_varlen", padding_free=True,
                                     gradient_checkpointing=False, optim="adamw_torch_fused", profile=True),
    "pf_liger_b32": lambda ds, pk: run_trl("pf_liger_b32", ds, pk, batch=32, attn="sdpa_varlen", padding_free=True,
                                           liger=True, gradient_checkpointing=False, optim="adamw_torch_fused"),
    "pf_compile_b32": lambda ds, pk: run_trl("pf_compile_b32", ds, pk, batch=32, attn="sdpa_varlen",
                                             padding_free=True, compile=True, gradient_checkpointing=False,
                                             optim="adamw_torch_fused", profile=True),
    "pf_liger_compile_b32": lambda ds, pk: run_trl("pf_liger_compile_b32", ds, pk, batch=32, attn="sdpa_varlen",
                                                   padding_free=True, liger=True, compile=True,
                                                   gradient_checkpointing=False, optim="adamw_torch_fused"),
    "pf_compile_b64": lambda ds, pk: run_trl("pf_compile_b64", ds, pk, batch=64, attn="sdpa_varlen",
                                             padding_free=True, compile=True, gradient_checkpointing=False,
                                             optim="adamw_torch_fused"),
    "raw_compile_b32": lambda ds, pk: run_raw("raw_compile_b32", ds, pk, batch=32, compile=True, profile=True),
    # transformers' own packed-sequence path: flex attention with a block mask built from position_ids
    "pf_flex_b32": lambda ds, pk: run_trl("pf_flex_b32", ds, pk, batch=32, attn="flex_attention", padding_free=True,
                                          gradient_checkpointing=False, optim="adamw_torch_fused"),
}


def check_varlen() -> dict:
    """Correctness first: a padding-free row through sdpa_varlen against each sequence alone through sdpa (bf16, GQA,
    head_dim 64 as benchmarked): relative error of logits and of the gradients, fresh random inputs."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from stages.shared import attention

    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    torch.manual_seed(1)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    ref.set_attn_implementation("sdpa")
    var = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    var.load_state_dict(ref.state_dict())
    used = attention.set_attention(var, attention.VARLEN)
    rows = [{"input_ids": torch.randint(3, 512, (n,)).tolist()} for n in (37, 300, 5, 129)]
    b = attention.padding_free_collator(tokenizer())(rows)
    b = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in b.items()}
    out = var(input_ids=b["input_ids"], position_ids=b["position_ids"], cu_seq_lens_q=b["cu_seq_lens_q"],
              cu_seq_lens_k=b["cu_seq_lens_k"], max_length_q=b["max_length_q"], max_length_k=b["max_length_k"]).logits[0]
    sep = torch.cat([ref(input_ids=torch.tensor([r["input_ids"]], device="cuda")).logits[0] for r in rows])
    out.float().square().mean().backward()
    sep.float().square().mean().backward()
    rel = lambda a, r: float((a.float() - r.float()).norm() / r.float().norm())
    grads = [rel(pv.grad, pr.grad) for pv, pr in zip(var.parameters(), ref.parameters()) if pr.grad is not None]
    res = {"attn": used, "logits_rel_err": rel(out, sep), "grad_rel_err_max": max(grads)}
    print("varlen check:", json.dumps(res), flush=True)
    return res


def cudnn_varlen(q, k, v, cu, max_len, scale):
    """cuDNN's fused attention over packed (T, H, D) rows: the aten op behind SDPA on nested tensors, with flash's
    cu_seq_lens (PyTorch's varlen_attn keeps this path switched off); GQA's KV heads repeated (the op has no GQA)."""
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False,
                                                   scale=scale)[0]


def check_varlen_kernels(which=("fa_cute", "cudnn"), iters=20) -> dict:
    """Candidates for the SFT attention (`which`: attention.fa_cute_fn, cudnn_varlen) against the varlen flash kernel of
    stages/shared/attention.py on one packed row of this benchmark's shape (32 samples of 128..2048 tokens, 16 query /
    8 KV heads of 64, bf16): relative error of the output and of dq/dk/dv, and the forward+backward time of each
    (CUDA-synchronised median of `iters`). cuDNN on the 7th lease's H200 (torch 2.11): output within 1.5e-3, dq inf,
    32x slower, and the SFT run through it crashed (illegal memory access). fa_cute on the 10th lease's H100: correct
    gradients, 1.30x faster, but 1.9% slower in the SFT step (then host-bound: batches grouped by length). On the 13th
    lease's H100 with random batches: +9.8% with the fp32 residual stream, +3.4% with the bf16 one (their per-call
    Python then keeps the GPU waiting); stages/shared/attention.py's fa_cute_fn, hardware.varlen_kernel=auto."""
    from stages.shared import attention

    flash = attention.varlen_fn()  # what attention.VARLEN runs, for the installed torch's signature

    g = torch.Generator().manual_seed(2)
    lens = torch.randint(128, 2049, (32,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)]).cuda()
    total, max_len = int(lens.sum()), int(lens.max())
    q = torch.randn(total, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(total, 16, 64, device="cuda", dtype=torch.bfloat16)
    kernels = {"flash": flash}
    if "fa_cute" in which and attention.fa_cute_fn() is not None:
        kernels["fa_cute"] = attention.fa_cute_fn()
    if "cudnn" in which:  # last: its illegal memory access (7th lease) would take the process's CUDA context
        kernels["cudnn"] = cudnn_varlen
    outs, res = {}, {"tokens": total}
    for name, fn in list(kernels.items()):
        for t in (q, k, v):  # the previous kernel's timed backwards accumulated into .grad
            t.grad = None
        t0 = time.perf_counter()
        try:  # the first call compiles a JIT kernel (fa_cute): timed apart
            out = fn(q, k, v, cu, max_len, 0.125)
            out.backward(dout)
            torch.cuda.synchronize()
        except Exception as e:
            traceback.print_exc()
            res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            del kernels[name]
            continue
        res[f"{name}_first_call_s"] = round(time.perf_counter() - t0, 1)
        outs[name] = [out.detach().float(), *(t.grad.float() for t in (q, k, v))]
        for t in (q, k, v):
            t.grad = None
        times = []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(q, k, v, cu, max_len, 0.125).backward(dout)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res[f"{name}_fwd_bwd_ms"] = round(1e3 * sorted(times)[len(times) // 2], 2)
    rel = lambda a, r: float((a - r).norm() / r.norm())
    for cand in (n for n in kernels if n != "flash"):
        res.update({f"{cand}_rel_err_{n}": rel(c, f)
                    for n, c, f in zip(("out", "dq", "dk", "dv"), outs[cand], outs["flash"])})
    print("varlen kernels:", json.dumps(res), flush=True)
    return res


# ---------------------------------------------------------------------------------------------------------------------
# The project's path

def project_cfg(overrides=()):
    """The cold_start_sft stage's composed config with hardware=gpu (what the stage receives)."""
    from omegaconf import OmegaConf

    from pipeline.plan import compose_config

    hardware = [] if any(o.startswith("hardware=") for o in overrides) else ["hardware=gpu"]
    cfg = compose_config([*hardware, *overrides])
    return OmegaConf.create(OmegaConf.to_container(cfg.cold_start_sft, resolve=True))


def nosync_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """SFTTrainer.compute_loss's default branch (NLL on TRL's fused LM head; TRL 1.16) with its per-step metrics kept
    on the GPU: TRL's version calls .item() (and `num_valid > 0`) on entropy, token accuracy and the token count every
    step, each a host sync that drains the GPU queue. Converted once per log instead (nosync_log)."""
    mode = "train" if self.model.training else "eval"
    inputs["use_cache"] = False
    outputs = model(**inputs, fused_lm_head=True)
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    if self.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (self.accelerator.num_processes // self.get_tp_size())
    valid = outputs.label_mask.sum().clamp(min=1)
    self._metrics[mode]["entropy"].append(outputs.entropy.detach().sum() / valid)
    self._metrics[mode]["mean_token_accuracy"].append(outputs.is_top1.sum() / valid)
    if mode == "train":  # padding-free rows: the token count is the row length, a host-side int
        self._total_train_tokens += inputs["position_ids"].size(1) if "attention_mask" not in inputs \
            else int(inputs["attention_mask"].sum())
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    return loss


def nosync_patch():
    """Patch SFTTrainer for the `*_nosync` variants; returns the function that undoes it."""
    from trl import SFTTrainer

    saved = SFTTrainer.compute_loss, SFTTrainer.log

    def log(self, logs, start_time=None):
        for vals in self._metrics["train" if self.model.training else "eval"].values():
            vals[:] = [float(v) if torch.is_tensor(v) else v for v in vals]
        return saved[1](self, logs, start_time)

    SFTTrainer.compute_loss, SFTTrainer.log = nosync_compute_loss, log

    def undo():
        SFTTrainer.compute_loss, SFTTrainer.log = saved

    return undo


def nomask_patch():
    """TRL's fused LM head scores only the positions with a label (`hidden_states[mask]`): a boolean index, so a host
    sync between the forward and the backward of every step. With this patch it takes its other path, which scores
    every position and zeroes the ignored ones (same loss; here 32 ignored positions of ~35k). Returns the undo."""
    import trl.trainer.utils as trl_utils

    saved = trl_utils._use_triton
    trl_utils._use_triton = lambda device: False  # only the head's choice: the kernels read their own module's

    def undo():
        trl_utils._use_triton = saved

    return undo


def settings_patch(expandable=False, coordinate_descent=False):
    """The allocator's expandable segments (fewer cudaMalloc calls and cache flushes when every step's shapes differ)
    and Inductor's coordinate-descent tuning of its Triton kernels, for one variant; returns the undo."""
    import torch._inductor.config as inductor

    saved = inductor.coordinate_descent_tuning
    if expandable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    inductor.coordinate_descent_tuning = coordinate_descent

    def undo():
        if expandable:
            torch.cuda.empty_cache()
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        inductor.coordinate_descent_tuning = saved

    return undo


def cute_host_time_patch():
    """Times the host side of each call into FlashAttention's CuTe interface (no sync: the launch, its argument checks
    and compile-cache key; the kernels run asynchronously). Must come before the first fa_cute_fn() of the process,
    which binds the interface's functions. Returns (durations by kind, undo)."""
    from vllm.vllm_flash_attn.cute import interface

    from stages.shared import attention

    if attention.fa_cute_fn.cache_info().currsize:
        raise RuntimeError("cute_host_time: run this variant first in its process (fa_cute_fn already bound)")
    seen = {"fwd": [], "bwd": []}
    originals = {"fwd": interface._flash_attn_fwd, "bwd": interface._flash_attn_bwd}

    def timed(kind):
        @functools.wraps(originals[kind])  # with its attributes: the interface reads its own compile_cache off it
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return originals[kind](*a, **k)
            finally:
                seen[kind].append(time.perf_counter() - t)
        return call

    interface._flash_attn_fwd, interface._flash_attn_bwd = timed("fwd"), timed("bwd")

    def undo():
        interface._flash_attn_fwd, interface._flash_attn_bwd = originals["fwd"], originals["bwd"]

    return seen, undo


def run_project(name, ds, peak, model_dir, *, batch, hardware=(), profile=False, fields=None, nosync=False,
                fa_cute=False, nomask=False, sync_debug=False, expandable=False, coordinate_descent=False,
                cute_host_time=False):
    """stages.shared.trainers.load_policy + stages.shared.trainers.sft exactly as cold_start_sft calls them
    (hardware=gpu, plus `hardware` overrides such as hardware.compile=backbone; `fields`: extra SFTConfig fields; `nosync`: TRL's
    per-step metric syncs removed, see nosync_compute_loss; `fa_cute`: hardware.varlen_kernel=fa_cute)."""
    from trl import SFTTrainer

    from stages.shared import hardware as hardware_mod
    from stages.shared import trainers

    hardware = [*hardware, *(["hardware.varlen_kernel=fa_cute"] if fa_cute else [])]
    cfg = project_cfg([f"cold_start_sft.per_device_train_batch_size={batch}", "cold_start_sft.max_length=2048",
                       "cold_start_sft.learning_rate=1e-4", "cold_start_sft.lr_scheduler_type=constant",
                       "cold_start_sft.warmup_ratio=0.0", f"cold_start_sft.logging_steps={WARM + TIMED}",
                       "cold_start_sft.save_steps=100000", *hardware])
    host_times = None
    if cute_host_time:  # before setup, whose kernel check binds the interface's functions
        host_times, undo_host_time = cute_host_time_patch()
    hardware_mod.setup(cfg)
    model, tok = trainers.load_policy(model_dir, cfg.hardware)
    n_params = sum(p.numel() for p in model.parameters())
    meter = Meter(name, profile, sync_debug)
    work = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    # Count the tokens of the trainer that sft() builds: wrap its training_step as it is constructed.
    orig_init = SFTTrainer.__init__

    def patched_init(self, *a, **k):
        orig_init(self, *a, **k)
        meter.wrap(self)

    SFTTrainer.__init__ = patched_init
    undos = [nosync_patch() if nosync else (lambda: None),
             nomask_patch() if nomask else (lambda: None), settings_patch(expandable, coordinate_descent)]
    if host_times is not None:
        undos.append(undo_host_time)
    try:
        model, trainer = trainers.sft(cfg, model, tok, ds, work, name=name, callbacks=[meter.callback()],
                                      max_steps=WARM + TIMED + (PROFILED if profile else 0), assistant_only_loss=False,
                                      save_strategy="no", **(fields or {}))
    finally:
        SFTTrainer.__init__ = orig_init
        for undo in undos:
            undo()
    a = trainer.args
    if host_times is not None:  # medians (the first calls JIT-compile), and the host seconds per step they add up to
        steps = WARM + TIMED
        for kind, times in host_times.items():
            median = statistics.median(times)
            print(f"{name}: CuTe interface host time, {kind}: {len(times)} calls ({len(times) / steps:.0f} per step), "
                  f"median {1e3 * median:.3f} ms, ~{1e3 * median * len(times) / steps:.1f} ms per step", flush=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # the mean over steps 1..WARM+TIMED: the
    # same data and initial weights in every variant, so it shows what a change does to the numbers
    r = _result(name, meter, n_params, peak, {"loss": round(losses[0], 4) if losses else None,
                                                "attn": model.config._attn_implementation,
                                                "gc": bool(a.gradient_checkpointing), "optim": str(a.optim),
                                                "batch": batch, "hardware": {k: cfg.hardware.get(k) for k in (
                                                    "padding_free", "compile", "liger_kernels",
                                                    "dataloader_workers")}})
    del trainer, model
    return r


# ---------------------------------------------------------------------------------------------------------------------
# GRPO: the reasoning_grpo stage's own run() on a ~300M model (conf/model/random_300m.yaml), with timers around
# generation, scoring and the whole step

GRPO_STEPS, GRPO_SKIP = 6, 2


def run_grpo(name, hardware=(), base=("hardware=gpu", "model=random_300m")):
    from omegaconf import OmegaConf
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from pipeline.plan import compose_config
    from stages.shared import data as data_mod
    from stages.shared import models
    from stages import reasoning_grpo

    full = compose_config([*base, f"reasoning_grpo.max_steps={GRPO_STEPS}",
                           "reasoning_grpo.prompts_per_step=8", "reasoning_grpo.num_generations=8",
                           "reasoning_grpo.eval_steps=0", "reasoning_grpo.eval_samples=0",
                           "reasoning_grpo.save_steps=1000", "reasoning_grpo.logging_steps=1", *hardware])
    model_dir = Path(tempfile.mkdtemp(prefix="grpo_model_"))
    torch.manual_seed(0)
    tok = models.build_tokenizer([str(data_mod.resolve_path(p)) for p in full.model.tokenizer.corpus],
                                 int(full.model.tokenizer.vocab_size))
    m = models.build_model(OmegaConf.to_container(full.model.architecture), tok)
    n_params = sum(p.numel() for p in m.parameters())
    m.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del m
    cfg = OmegaConf.create(OmegaConf.to_container(full.reasoning_grpo, resolve=True))
    times = {"generate": [], "generate_and_score": [], "step": []}

    def timed(key, fn):
        def wrapper(self, *a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(self, *a, **k)
            torch.cuda.synchronize()
            times[key].append((self.state.global_step, time.perf_counter() - t))
            return out
        return wrapper

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times["step"].append((state.global_step - 1, time.perf_counter() - self.t))

    saved = {k: getattr(GRPOTrainer, k) for k in ("_generate", "_generate_and_score_completions")}
    GRPOTrainer._generate = timed("generate", saved["_generate"])
    GRPOTrainer._generate_and_score_completions = timed("generate_and_score",
                                                        saved["_generate_and_score_completions"])
    out_dir, work = Path(tempfile.mkdtemp(prefix="grpo_out_")), Path(tempfile.mkdtemp(prefix="grpo_work_"))
    t0 = time.time()
    try:
        metrics = reasoning_grpo.run(cfg, {"model": model_dir}, out_dir, work, callbacks=[StepTimer()])
    finally:
        for k, v in saved.items():
            setattr(GRPOTrainer, k, v)
    wall = time.time() - t0
    per = lambda key: sum(d for s, d in times[key] if s >= GRPO_SKIP) / max(1, sum(1 for s, _ in times[key]
                                                                                 if s >= GRPO_SKIP))
    step, gen, gen_score = per("step"), per("generate"), per("generate_and_score")
    log = out_dir / "log_history.jsonl"  # under FSDP only the main process writes it
    history = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.is_file() else []
    lengths = [e["completions/mean_length"] for e in history if "completions/mean_length" in e]
    samples = int(cfg.prompts_per_step) * int(cfg.num_generations)
    r = {"name": name, "params": n_params, "step_s": round(step, 3), "generate_s": round(gen, 3),
         "score_and_logprobs_s": round(gen_score - gen, 3), "train_s": round(step - gen_score, 3),
         "generate_frac": round(gen / step, 3), "train_frac": round((step - gen_score) / step, 3),
         "samples_per_step": samples, "completion_len": round(sum(lengths) / max(1, len(lengths)), 1),
         "completion_tokens_per_s_generate": round(samples * (sum(lengths) / max(1, len(lengths))) / gen),
         "stage_wall_s": round(wall, 1), "use_vllm": bool(cfg.use_vllm),
         "hardware": {k: cfg.hardware.get(k) for k in ("attn_implementation", "liger_kernels")},
         "metrics": {k: v for k, v in metrics.items() if k in ("train_runtime", "global_step")}}
    return r


PROJECT_JOBS = {
    "project_b8": dict(batch=8),
    "project_b32": dict(batch=32, profile=True),
    "project_b32_workers2": dict(batch=32, hardware=["hardware.dataloader_workers=2"]),
    "project_b32_backbone": dict(batch=32, hardware=["hardware.compile=backbone"], profile=True),
    "project_b32_nocompile": dict(batch=32, hardware=["hardware.compile=false"]),
    # issue 16 item 4 (fp32 master weights, 2 loader workers: conf/hardware/gpu.yaml now); the default, unprofiled
    "project_b32_default": dict(batch=32),
    # transformers' Trainer checks every micro-step's loss for NaN/inf (`logging_nan_inf_filter`): a host sync. Off in
    # every trainer since trainers.trainer_args logs NaN losses as NaN, so this is the default again (the sixth
    # lease's pair); project_b32_nanfilter_on measures the filter's cost
    "project_b32_nanfilter_off": dict(batch=32, fields={"logging_nan_inf_filter": False}),
    "project_b32_nanfilter_on": dict(batch=32, fields={"logging_nan_inf_filter": True}),
    # ... and TRL's per-step metric syncs (entropy, token accuracy, token count) removed too
    "project_b32_nosync": dict(batch=32, fields={"logging_nan_inf_filter": False}, nosync=True),
    # the padding-free attention through FlashAttention's CuTe-DSL (FA3-class) kernels instead of PyTorch's varlen flash
    # kernel (FA2-class, ~25% of the step's GPU time); alone and with the syncs removed
    "project_b32_fa_cute": dict(batch=32, fa_cute=True),
    "project_b32_fa_cute_nosync": dict(batch=32, fields={"logging_nan_inf_filter": False}, nosync=True, fa_cute=True),
    # the whole decoder stack as one graph, with the 2 loader workers (and without host syncs)
    "project_b32_backbone_workers2": dict(batch=32, hardware=["hardware.compile=backbone"]),
    "project_b32_backbone_nosync": dict(batch=32, hardware=["hardware.compile=backbone"],
                                        fields={"logging_nan_inf_filter": False}, nosync=True),
    # the thirteenth lease: where the ~16% of the step the GPU waits goes. Every host sync of a warm-up step by call
    # stack (sync_debug), a profile of the timed ones, then each remaining sync removed: the batch's copy to the GPU
    # made asynchronous (pinned memory, accelerate's non_blocking), TRL's fused head without its boolean index (nomask)
    "project_b32_nosync_profile": dict(batch=32, nosync=True, profile=True, sync_debug=True),
    "project_b32_nosync_nb": dict(batch=32, nosync=True, fields={"accelerator_config": {"non_blocking": True}}),
    "project_b32_nosync_nomask": dict(batch=32, nosync=True, nomask=True),
    "project_b32_nosync_nb_nomask": dict(batch=32, nosync=True, nomask=True, sync_debug=True,
                                         fields={"accelerator_config": {"non_blocking": True}}),
    "project_b32_nosync_nb_nomask_profile": dict(batch=32, nosync=True, nomask=True, profile=True,
                                                 fields={"accelerator_config": {"non_blocking": True}}),
    "project_b32_fa_cute_nosync_nb_nomask": dict(batch=32, nosync=True, nomask=True, fa_cute=True, sync_debug=True,
                                                 fields={"accelerator_config": {"non_blocking": True}}),
    "project_b48_nosync_nb_nomask": dict(batch=48, nosync=True, nomask=True,
                                         fields={"accelerator_config": {"non_blocking": True}}),
    # The syncs were not it (call 2: 6 per step, removing all but one changed nothing). The project's SFT sampled its
    # padding-free batches grouped by length, which only saves padding where there is some: steps then run from ~4k
    # tokens (host-bound) to ~65k (the 63 GB peak). Random batches (what the stage does now), then the rest on top
    "project_b32_random": dict(batch=32, fields={"train_sampling_strategy": "random"}),
    "project_b32_random_nosync": dict(batch=32, nosync=True, fields={"train_sampling_strategy": "random"}),
    "project_b32_random_nosync_expandable": dict(batch=32, nosync=True, expandable=True,
                                                 fields={"train_sampling_strategy": "random"}),
    "project_b32_random_nosync_cdt": dict(batch=32, nosync=True, coordinate_descent=True,
                                          fields={"train_sampling_strategy": "random"}),
    "project_b32_random_nosync_profile": dict(batch=32, nosync=True, profile=True,
                                              fields={"train_sampling_strategy": "random"}),
    # with random batches the default itself (call 4 on): the CuTe kernels again (the tenth lease's -1.9% was measured
    # with host-bound short steps), the allocator's expandable segments again, 48 samples per step
    "project_b32_nosync_expandable": dict(batch=32, nosync=True, expandable=True),
    "project_b32_fa_cute_nosync_expandable": dict(batch=32, nosync=True, fa_cute=True, expandable=True),
    "project_b48_nosync": dict(batch=48, nosync=True),
    # The project now (call 6): random batches, the bf16 residual stream (hardware.residual_dtype) and the CuTe kernels
    # where they import (hardware.varlen_kernel=auto), against each of them undone
    "project_b32_torch_kernel": dict(batch=32, hardware=["hardware.varlen_kernel=torch"]),
    "project_b32_fp32_residual": dict(batch=32, hardware=["hardware.residual_dtype=float32"]),
    "project_b32_torch_kernel_fp32_residual": dict(batch=32, hardware=["hardware.varlen_kernel=torch",
                                                                       "hardware.residual_dtype=float32"]),
    "project_b32_expandable": dict(batch=32, expandable=True),
    # what hardware=gpu ran before the thirteenth lease (batches grouped by length, fp32 residual stream, PyTorch's kernel)
    "project_b32_lease12_default": dict(batch=32, hardware=["hardware.varlen_kernel=torch",
                                                            "hardware.residual_dtype=float32"],
                                        fields={"train_sampling_strategy": "group_by_length"}),
    "project_b32_default_profile": dict(batch=32, profile=True),
    "project_b32_torch_kernel_profile": dict(batch=32, hardware=["hardware.varlen_kernel=torch"], profile=True),
    # pure bf16 weights and AdamW state (what hardware=gpu did before fp32 master weights became the default)
    "project_b32_bf16_weights": dict(batch=32, hardware=["hardware.weights_dtype=bfloat16"]),
    # the fourteenth lease: the fp32 master weights in the optimizer, the model in bf16 (hardware.master_weights:
    # optimizer, the default now) against fp32 weights in the model under autocast (model: the default before), and
    # the host time of the CuTe interface's calls
    "project_b32_model_master": dict(batch=32, hardware=["hardware.master_weights=model"]),
    "project_b32_torch_kernel_model_master": dict(batch=32, hardware=["hardware.master_weights=model",
                                                                      "hardware.varlen_kernel=torch"]),
    "project_b32_default_host_time": dict(batch=32, cute_host_time=True),
    "project_b32_model_master_profile": dict(batch=32, hardware=["hardware.master_weights=model"], profile=True),
    # under `accelerate launch --use_fsdp ... --num_processes N` (benchmarks/lent_gpu.sh fsdp): 32 samples per GPU
    "project_fsdp_b32": dict(batch=32, hardware=["hardware=multi_gpu"]),
}
GRPO_JOBS = {
    "grpo_gpu": dict(),
    "grpo_no_liger": dict(hardware=["hardware.liger_kernels=false"]),
    # under accelerate launch with FSDP: each GPU its own 8 prompts x 8 samples; parameters resharded after every
    # forward (full_shard) or kept whole from forward to backward (shard_grad_op)
    "grpo_fsdp": dict(base=("hardware=multi_gpu", "model=random_300m")),
    "grpo_fsdp_grad_op": dict(base=("hardware=multi_gpu", "model=random_300m"), hardware=["hardware.fsdp=shard_grad_op"]),
}


def main(argv):
    if argv[:1] == ["kernels"]:
        check_varlen_kernels(*([argv[1:]] if argv[1:] else []))
        return
    mode = argv[0] if argv and argv[0] in ("project", "explore", "grpo") else "project"
    names = [a for a in argv if a not in ("project", "explore", "grpo")]
    peak = ceiling()
    print(f"bf16 matmul ceiling {peak / 1e12:.0f} TFLOP/s; torch {torch.__version__}; "
          f"{torch.cuda.get_device_name()}", flush=True)
    results = []
    if mode == "grpo":
        jobs = [(n, (lambda n=n: run_grpo(n, **GRPO_JOBS[n]))) for n in (names or list(GRPO_JOBS))]
    elif mode == "explore":
        ds = data()
        try:
            check_varlen()
        except Exception:
            traceback.print_exc()
        jobs = [(n, (lambda n=n: EXPLORE[n](ds, peak))) for n in (names or list(EXPLORE))]
    else:
        ds = data()
        model_dir = Path(tempfile.mkdtemp(prefix="bench_model_"))
        build_model().save_pretrained(model_dir)
        tokenizer().save_pretrained(model_dir)
        wanted = names or ["trl_defaults", "project_b8", "project_b32"]
        jobs = [(n, (lambda n=n: EXPLORE[n](ds, peak) if n in EXPLORE else
                     run_project(n, ds, peak, model_dir, **PROJECT_JOBS[n]))) for n in wanted]
    world, main_process = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0
    for name, job in jobs:
        t = time.time()
        try:
            r = job()
        except Exception as e:
            traceback.print_exc()
            r = {"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        r["wall_s"] = round(time.time() - t, 1)
        if world > 1 and "tokens_per_s" in r:  # each process measured its own GPU's tokens: the whole is the sum
            r.update(gpus=world, tokens_per_s_per_gpu=r["tokens_per_s"], tokens_per_s=r["tokens_per_s"] * world)
        if world > 1 and "samples_per_step" in r:  # GRPO: each process its own prompts x samples
            r.update(gpus=world, samples_per_step=r["samples_per_step"] * world)
        if main_process:
            print(json.dumps(r), flush=True)
        results.append(r)
        _cleanup()
    if not main_process:
        return
    (OUT / f"bench_{mode}{'_fsdp' if world > 1 else ''}.json").write_text(
        json.dumps({"ceiling_tflops": peak / 1e12, "gpus": world, "results": results}, indent=1))
    if mode == "grpo":
        print(f"\n{'variant':16s} {'step s':>7s} {'gen s':>7s} {'score s':>7s} {'train s':>7s} {'gen %':>6s} "
              f"{'train %':>7s} {'gen tok/s':>9s}")
        for r in results:
            if "step_s" not in r:
                print(f"{r['name']:16s} ERROR {r.get('error')}")
                continue
            print(f"{r['name']:16s} {r['step_s']:7.3f} {r['generate_s']:7.3f} {r['score_and_logprobs_s']:7.3f} "
                  f"{r['train_s']:7.3f} {100 * r['generate_frac']:6.1f} {100 * r['train_frac']:7.1f} "
                  f"{r['completion_tokens_per_s_generate']:9d}")
        return
    base = next((r for r in results if r["name"] == "trl_defaults" and "tokens_per_s" in r), None)
    print(f"\n{'variant':24s} {'tok/s':>8s} {'MFU':>6s} {'x TRL':>6s} {'step s':>7s} {'tok/step':>8s} {'mem GB':>6s} "
          f"{'wall s':>6s}")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"{r['name']:24s} ERROR {r.get('error')}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{r['name']:24s} {r['tokens_per_s']:8d} {r['mfu']:6.3f} {ratio:6.2f} {r['step_s']:7.3f} "
              f"{r['tokens_per_step']:8d} {r['peak_mem_gb']:6.1f} {r['wall_s']:6.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
