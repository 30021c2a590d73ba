"""hardware=gpu / multi_gpu on a machine without GPUs: config composition, launch commands, and the GPU code paths
that can run on a CPU (the padding-free attention's fallback, which must give the same numbers)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pipeline import runner
from pipeline.plan import compose_config, plan
from stages.shared import hardware

TRAINING_STAGES = ("base", "cold_start_sft", "reasoning_grpo", "merged_sft_alignment", "distill")


def _spec(tmp_path, module: str) -> str:
    path = tmp_path / f"{module}.json"
    path.write_text(json.dumps({"name": module, "module": module, "config": {}}))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Composition

def test_gpu_composes_with_the_training_settings():
    cfg = compose_config(["hardware=gpu"])
    hw = cfg.hardware
    assert hw.device == "cuda" and hw.bf16 and hw.launcher == "python" and hw.num_processes == 1
    assert hw.attn_implementation == "sdpa_varlen" and hw.padding_free and hw.compile
    assert hw.optim == "adamw_torch_fused" and not hw.gradient_checkpointing
    assert hw.dataloader_workers >= 1
    for stage in TRAINING_STAGES:  # every trainer sees the same node, by interpolation
        assert cfg[stage].hardware == hw, stage


def test_multi_gpu_composes_with_fsdp_and_accelerate():
    hw = compose_config(["hardware=multi_gpu"]).hardware
    assert hw.launcher == "accelerate" and hw.num_processes == "auto" and hw.num_machines == 1
    assert hw.fsdp and hw.bf16 and hw.vllm.tensor_parallel_size == 1
    assert hw.vllm.data_parallel_size == "auto"  # generation: one engine per GPU
    assert {"cold_start_sft", "reasoning_grpo", "merged_sft_alignment"} <= set(hw.distributed_modules)
    assert "evaluate" not in hw.distributed_modules and "rejection_sampling" not in hw.distributed_modules


def test_random_300m_model_composes():
    model = compose_config(["hardware=gpu", "model=random_300m"]).base.model
    arch = model.architecture
    assert model.source == "build" and arch.num_hidden_layers == 24 and arch.hidden_size == 1024
    assert not arch.tie_word_embeddings


def test_only_precision_in_hardware_changes_versions():
    versions = {hw: [s.version for s in plan(compose_config([f"hardware={hw}"]))] for hw in ("cpu", "gpu", "multi_gpu")}
    assert versions["gpu"] == versions["multi_gpu"]  # same precision; devices, launcher and FSDP are how, not what
    assert versions["cpu"] != versions["gpu"]  # fp32 against bf16 autocast: other numbers


def test_hardware_knobs_override_from_the_command_line():
    hw = compose_config(["hardware=gpu", "hardware.compile=backbone", "hardware.dataloader_workers=0"]).hardware
    assert hw.compile == "backbone" and hw.dataloader_workers == 0


# ---------------------------------------------------------------------------------------------------------------------
# Launch commands

def test_python_launcher_runs_the_runner(tmp_path):
    for name in ("cpu", "gpu"):
        hw = compose_config([f"hardware={name}"]).hardware
        spec = _spec(tmp_path, "cold_start_sft")
        assert runner.launch_command(dict(hw), spec) == [sys.executable, "-m", "pipeline.runner", spec]


def _parsed(cmd):
    """accelerate's own parser accepts the flags (so a typo fails here, not on a GPU node)."""
    from accelerate.commands.launch import launch_command_parser

    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(cmd[3:])


def test_multi_gpu_launches_trainers_with_accelerate_fsdp(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    hw = OmegaConf.to_container(compose_config(["hardware=multi_gpu"]).hardware)
    spec = _spec(tmp_path, "cold_start_sft")
    cmd = runner.launch_command(hw, spec)
    args = _parsed(cmd)
    assert args.num_processes == 4 and args.num_machines == 1 and args.mixed_precision == "bf16"
    assert args.use_fsdp and args.fsdp_version == "2" and "--fsdp_reshard_after_forward" in cmd
    assert args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP" and args.fsdp_state_dict_type == "FULL_STATE_DICT"
    assert cmd[-3:] == ["-m", "pipeline.runner", spec] and "--machine_rank" not in cmd
    fsdp1 = _parsed(runner.launch_command({**hw, "fsdp_version": 1}, spec))
    assert fsdp1.fsdp_version == "1" and fsdp1.fsdp_sharding_strategy == "FULL_SHARD"


def test_multi_gpu_on_one_gpu_runs_the_plain_process(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    hw = OmegaConf.to_container(compose_config(["hardware=multi_gpu"]).hardware)
    spec = _spec(tmp_path, "cold_start_sft")
    assert runner.launch_command(hw, spec) == [sys.executable, "-m", "pipeline.runner", spec]


def test_multi_gpu_keeps_generation_stages_in_one_process(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    hw = OmegaConf.to_container(compose_config(["hardware=multi_gpu"]).hardware)
    for module in ("evaluate", "rejection_sampling", "report"):
        spec = _spec(tmp_path, module)
        assert runner.launch_command(hw, spec) == [sys.executable, "-m", "pipeline.runner", spec]


def test_multi_node_counts_processes_over_machines_and_reads_the_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("MACHINE_RANK", "1")
    monkeypatch.setenv("MAIN_PROCESS_IP", "10.0.0.7")
    monkeypatch.setenv("MAIN_PROCESS_PORT", "29600")
    hw = {"launcher": "accelerate", "num_processes": "auto", "num_machines": 2, "bf16": True,
          "fsdp": "full_shard auto_wrap", "fsdp_version": 2, "distributed_timeout_s": 900}
    cmd = runner.launch_command(hw, _spec(tmp_path, "reasoning_grpo"))
    args = _parsed(cmd)
    assert args.num_processes == 16 and args.num_machines == 2 and args.machine_rank == 1
    assert args.main_process_ip == "10.0.0.7" and args.main_process_port == 29600
    assert args.fsdp_version == "2" and "--fsdp_reshard_after_forward" in cmd and "--fsdp_sharding_strategy" not in cmd
    assert args.rdzv_conf == "timeout=900"  # a node that never joins fails the rendezvous after the configured time


def test_slurm_multi_node_starts_one_launcher_per_node(tmp_path, monkeypatch):
    """hardware.node_launcher=srun: an srun over the nodes whose shell line, run on node 1 of the allocation, is the
    accelerate command with that node's rank and the allocation's first host (checked by running it with echo)."""
    import os
    import subprocess

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("MAIN_PROCESS_IP", raising=False)
    monkeypatch.setattr(sys, "executable", "echo")
    hw = {"launcher": "accelerate", "num_processes": "auto", "num_machines": 2, "node_launcher": "srun",
          "bf16": True, "fsdp": "full_shard auto_wrap", "distributed_timeout_s": 900}
    spec = _spec(tmp_path, "cold_start_sft")
    cmd = runner.launch_command(hw, spec)
    assert cmd[:6] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-[a-b]"}
    words = subprocess.run(["bash", "-c", cmd[6]], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert words[:2] == ["-m", "accelerate.commands.launch"] and words[-3:] == ["-m", "pipeline.runner", spec]
    args = _parsed([sys.executable, *words])
    assert args.num_processes == 16 and args.num_machines == 2 and args.machine_rank == 1
    assert args.main_process_ip == "gpu-a" and args.main_process_port == 29500 and args.use_fsdp


def test_ddp_without_fsdp(tmp_path):
    cmd = runner.launch_command({"launcher": "accelerate", "num_processes": 2, "bf16": False},
                                _spec(tmp_path, "distill"))
    args = _parsed(cmd)
    assert args.multi_gpu and not args.use_fsdp and args.num_processes == 2 and args.mixed_precision == "no"


def test_stage_env_threads_and_path(monkeypatch):
    monkeypatch.delenv("R1FLOW_TORCH_THREADS", raising=False)
    env = runner.stage_env(dict(compose_config(["hardware=gpu"]).hardware))
    assert env["OMP_NUM_THREADS"] == "8" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert str(runner.PROJECT_ROOT) in env["PYTHONPATH"].split(":")
    monkeypatch.setenv("R1FLOW_TORCH_THREADS", "3")  # the override reaches the stage's OpenMP pool too
    env = runner.stage_env(dict(compose_config(["hardware=gpu"]).hardware))
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"


# ---------------------------------------------------------------------------------------------------------------------
# GPU code paths that also run on a CPU

def _tiny_model():
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(64)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t1", pad_token="t2")


def test_padding_free_rows_match_separate_sequences():
    """sdpa_varlen keeps the sequences of a padding-free row apart (on CPU through a block mask; on GPU through
    varlen flash attention, checked by benchmarks/bench_sft_gpu.py explore): same logits as one sequence at a time."""
    from stages.shared import attention

    model = _tiny_model()
    attention.register()
    model.set_attn_implementation(attention.VARLEN)
    rows = [{"input_ids": torch.randint(3, 64, (n,)).tolist()} for n in (7, 3, 12, 1)]
    batch = attention.padding_free_collator(_tokenizer())(rows)
    assert batch["input_ids"].shape == (1, 23) and "attention_mask" not in batch
    sep = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows])
    with_cu = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    cu_seq_lens_q=batch["cu_seq_lens_q"], max_length_q=batch["max_length_q"]).logits[0]
    from_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    torch.testing.assert_close(with_cu, sep, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_positions, sep, atol=1e-5, rtol=1e-5)


def test_varlen_attention_leaves_padded_batches_and_generation_to_sdpa():
    from stages.shared import attention

    model = _tiny_model()
    ref = _tiny_model()
    ref.set_attn_implementation("sdpa")
    attention.register()
    model.set_attn_implementation(attention.VARLEN)
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               ref(input_ids=ids, attention_mask=mask).logits)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert torch.equal(out, ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                         pad_token_id=2))


def test_gpu_settings_are_inert_on_cpu(monkeypatch):
    from stages.shared import attention, trainers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hw = dict(compose_config(["hardware=gpu"]).hardware)
    model = _tiny_model()
    assert attention.set_attention(model, hw["attn_implementation"]) == "sdpa"  # no varlen flash attention without CUDA
    assert not attention.use_padding_free(hw, model)
    assert not attention.compile_for_training(model, hw)
    assert not attention.bf16_residual_for_training(model, hw)
    assert attention.resolve_varlen_kernel(hw) == "torch"
    args = hardware.hardware_args(hw)
    assert args["use_cpu"] and not args["bf16"] and not args["dataloader_pin_memory"]
    assert args["dataloader_num_workers"] == 0 and not args.get("use_liger_kernel")


def test_sft_keeps_the_residual_stream_in_bf16_under_autocast_and_drops_the_cast_after(monkeypatch):
    """hardware.residual_dtype=bfloat16: with fp32 weights under bf16 autocast the layers pass bf16 hidden states (as
    FSDP's bf16 policy does), where autocast alone passes fp32; outside autocast, and after training, nothing changes."""
    from stages.shared import attention
    from stages.shared.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CPU's autocast stands in for CUDA's
    model = _tiny_model()
    seen = []
    for layer in (model.model.layers[0], model.model.layers[-1]):
        layer.register_forward_hook(lambda m, args, kwargs, out: seen.append(
            (args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True)
    ids = torch.randint(3, 64, (1, 9))

    def forward(autocast: bool):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits.float()
        return logits, list(seen)

    fp32_residual, dtypes = forward(True)
    assert dtypes == [torch.float32] * 2
    assert attention.bf16_residual_for_training(model, {"device": "cuda", "residual_dtype": "bfloat16"})
    bf16_residual, dtypes = forward(True)
    assert dtypes == [torch.bfloat16] * 2
    assert (bf16_residual - fp32_residual).abs().max() < 0.05 * fp32_residual.abs().max()  # the same model, rounded
    assert forward(False)[1] == [torch.float32] * 2
    attention.undo_for_training(model)
    assert torch.equal(forward(True)[0], fp32_residual)
    assert not attention.bf16_residual_for_training(model, {"device": "cuda", "residual_dtype": "float32"})
    with pytest.raises(UserError, match="hardware.residual_dtype='fp16'"):
        attention.bf16_residual_for_training(model, {"device": "cuda", "residual_dtype": "fp16"})


def _naive_varlen(q, k, v, cu, scale):
    """Causal attention of each packed sequence alone, GQA by repeating the KV heads: (out, lse) as FlashAttention's."""
    rep = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].repeat_interleave(rep, 1).transpose(0, 1), \
            v[a:b].repeat_interleave(rep, 1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        lses.append(scores.logsumexp(-1))
    return torch.cat(outs), torch.cat(lses, dim=1)


def test_a_varlen_kernel_pair_becomes_one_differentiable_op_that_compiles():
    """varlen_kernel_op (how the FlashAttention CuTe-DSL kernels reach the compiled layers) with a reference kernel pair:
    the op's output and its q/k/v gradients, eager and through torch.compile, are the reference's (GQA, 3 sequences)."""
    from stages.shared import attention

    def forward(q, k, v, cu, max_len, scale):
        return tuple(t.detach() for t in _naive_varlen(q, k, v, cu, scale))

    def backward(q, k, v, out, dout, lse, cu, max_len, scale):  # by hand: autograd does not run inside a custom op
        rep = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qs, os_, dos = (t[a:b].transpose(0, 1) for t in (q, out, dout))
            ks, vs = (t[a:b].repeat_interleave(rep, 1).transpose(0, 1) for t in (k, v))
            p = ((qs @ ks.transpose(1, 2)) * scale - lse[:, a:b, None]).exp().tril()
            ds = p * (dos @ vs.transpose(1, 2) - (dos * os_).sum(-1, keepdim=True)) * scale
            dq[a:b] = (ds @ ks).transpose(0, 1)
            n = k.shape[1]  # the query heads of one KV head summed
            dk[a:b] = (ds.transpose(1, 2) @ qs).reshape(n, rep, b - a, -1).sum(1).transpose(0, 1)
            dv[a:b] = (p.transpose(1, 2) @ dos).reshape(n, rep, b - a, -1).sum(1).transpose(0, 1)
        return dq, dk, dv

    attend = attention.varlen_kernel_op("r1flow_test_varlen", forward, backward, device_type="cpu")
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 7, 16], dtype=torch.int32)
    q, k, v = torch.randn(16, 4, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    dout = torch.randn(16, 4, 8)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout)
        return out.detach(), [t.grad for t in leaves]

    ref_out, ref_grads = grads(lambda q, k, v: _naive_varlen(q, k, v, cu, 8 ** -0.5)[0])
    for fn in (attend, torch.compile(attend, backend="aot_eager", fullgraph=True)):
        out, got = grads(lambda q, k, v: fn(q, k, v, cu, 9, None))
        torch.testing.assert_close(out, ref_out)
        for g, r in zip(got, ref_grads):
            torch.testing.assert_close(g, r)


def test_the_varlen_kernel_setting_is_checked_and_falls_back_where_fa_cute_cannot_run(monkeypatch):
    from stages.shared import attention
    from stages.shared.errors import UserError

    assert attention.resolve_varlen_kernel({"device": "cpu", "varlen_kernel": "auto"}) == "torch"
    with pytest.raises(UserError, match="hardware.varlen_kernel='fa3'"):
        attention.resolve_varlen_kernel({"device": "cuda", "varlen_kernel": "fa3"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(attention, "fa_cute_fn", lambda: None)  # vLLM's CuTe kernels not importable
    assert attention.resolve_varlen_kernel({"device": "cuda", "varlen_kernel": "auto"}) == "torch"
    with pytest.raises(UserError, match="varlen_kernel=fa_cute.*Fix: hardware.varlen_kernel=auto"):
        attention.resolve_varlen_kernel({"device": "cuda", "varlen_kernel": "fa_cute"})
    monkeypatch.setattr(attention, "fa_cute_fn", lambda: (lambda *a: None))
    assert attention.resolve_varlen_kernel({"device": "cuda", "varlen_kernel": "auto"}) == "fa_cute"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100: not Hopper
    assert attention.resolve_varlen_kernel({"device": "cuda", "varlen_kernel": "auto"}) == "torch"


def test_compile_mode_is_checked(monkeypatch):
    from stages.shared import attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="hardware.compile"):
        attention.compile_for_training(_tiny_model(), {"device": "cuda", "compile": "everything"})


# ---------------------------------------------------------------------------------------------------------------------
# Precision and FSDP arguments

def test_gpu_trains_fp32_master_weights_under_bf16_autocast(monkeypatch):
    """hardware=gpu: models that train load in fp32 (AdamW's updates land on fp32 weights), the trainer computes in
    bf16 (autocast); hardware.weights_dtype=bfloat16 is pure bf16. A CPU never loads bf16."""
    from stages.shared import trainers
    from stages.shared.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("gpu", "multi_gpu"):
        hw = dict(compose_config([f"hardware={name}"]).hardware)
        assert hardware.model_dtype(hw) == "float32" and hw["bf16"]
    hw = dict(compose_config(["hardware=gpu", "hardware.weights_dtype=bfloat16"]).hardware)
    assert hardware.model_dtype(hw) == "bfloat16"
    assert hardware.model_dtype(dict(compose_config(["hardware=cpu"]).hardware)) == "float32"
    with pytest.raises(UserError, match="weights_dtype"):
        hardware.model_dtype({**hw, "weights_dtype": "float16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.model_dtype(hw) == "float32"


def test_bf16_weights_lose_small_adamw_updates_fp32_master_weights_keep_them():
    """Why weights_dtype defaults to float32: one AdamW step at an RL learning rate leaves bf16 weights of ordinary
    size unchanged (the update is below bf16's resolution), while fp32 weights move by about the learning rate."""
    torch.manual_seed(0)
    init = torch.randn(4096) * 0.5
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.nn.Parameter(init.to(dtype).clone())
        opt = torch.optim.AdamW([w], lr=1e-5, weight_decay=0.0)
        w.grad = torch.randn_like(w)
        opt.step()
        moved[dtype] = (w.detach().float() != init.to(dtype).float()).float().mean().item()
    assert moved[torch.float32] > 0.99
    assert moved[torch.bfloat16] < 0.05


def test_fsdp_arguments_only_for_several_processes(monkeypatch):
    from trl import SFTConfig

    from stages.shared import trainers
    from stages.shared.errors import UserError

    hw = dict(compose_config(["hardware=multi_gpu"]).hardware)
    monkeypatch.setattr(hardware, "world_size", lambda: 1)
    assert "fsdp" not in hardware.hardware_args(hw)  # one process (multi_gpu on a 1-GPU node): plain training
    monkeypatch.setattr(hardware, "world_size", lambda: 2)
    args = hardware.hardware_args(hw)
    assert args["fsdp"] is True and args["fsdp_config"]["version"] == 2
    assert args["fsdp_config"]["reshard_after_forward"] is True
    assert args["fsdp_config"]["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    grad_op = hardware.fsdp_args({**hw, "fsdp": "shard_grad_op auto_wrap"})["fsdp_config"]
    assert grad_op["reshard_after_forward"] is False
    v1 = hardware.fsdp_args({**hw, "fsdp_version": 1, "fsdp": "hybrid_shard auto_wrap offload"})["fsdp_config"]
    assert v1["version"] == 1 and v1["reshard_after_forward"] == "hybrid_shard" and v1["cpu_offload"]
    with pytest.raises(UserError, match="fsdp_version=1"):
        hardware.fsdp_args({**hw, "fsdp": "hybrid_shard"})
    # transformers accepts them and builds accelerate's FSDP plugin of that version from them
    config = SFTConfig(output_dir="unused", use_cpu=True, report_to="none", gradient_checkpointing=False,
                       **hardware.fsdp_args(hw))
    assert config.fsdp_plugin_args["fsdp_version"] == 2 and config.fsdp_plugin_args["reshard_after_forward"] is True


def test_training_setup_turns_cudnn_attention_off_on_gpus(monkeypatch):
    """cuDNN's SDPA backward returns NaN for padded batches of some lengths (stages/shared/attention.configure_attention):
    hardware=gpu and multi_gpu train without it unless hardware.cudnn_attention=true; a CPU run leaves it alone."""
    from stages.shared import trainers

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for name in ("gpu", "multi_gpu"):
            torch.backends.cuda.enable_cudnn_sdp(True)
            hardware.setup({"hardware": dict(compose_config([f"hardware={name}"]).hardware), "seed": 0})
            assert not torch.backends.cuda.cudnn_sdp_enabled(), name
        hardware.setup({"hardware": dict(compose_config(["hardware=gpu", "hardware.cudnn_attention=true"]).hardware),
                        "seed": 0})
        assert torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(True)
        hardware.setup({"hardware": dict(compose_config(["hardware=cpu"]).hardware), "seed": 0})
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
