"""Models under FSDP on two CPU processes (gloo), as accelerate runs them under `hardware=multi_gpu`: a checkpoint loads
whole on every process; stages.shared.trainers.save_model of a tiny Qwen3 sharded with FSDP2's fully_shard writes the
whole model, once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _model_and_tokenizer(tied: bool = False, seed: int = 0):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")),
                                        eos_token="t1", pad_token="t2")
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
                         eos_token_id=1, pad_token_id=2, bos_token_id=1)
    return Qwen3ForCausalLM(config), tokenizer


def _exit_without_teardown() -> None:
    """End a worker that finished its work (its checks passed: a failure raised before this) without the interpreter's
    teardown, where gloo's threads can still abort the process ("terminate called without an active exception",
    SIGABRT), which mp.spawn reports as a failure. Seen once under `make test`'s two workers on 2 busy cores."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _shard(model, world: int):
    """What accelerate's TRANSFORMER_BASED_WRAP does under FSDP2: a unit per decoder layer, then the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _assert_whole_state_is(model, expected: dict, rank: int) -> None:
    """Gather the sharded model's full state dict (a collective) and compare it on the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        assert set(state) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), name


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from stages.shared import trainers

        model, tokenizer = _model_and_tokenizer()
        assert not trainers.fsdp_sharded(model)
        _shard(model, world)
        assert trainers.fsdp_sharded(model)
        local = model.model.embed_tokens.weight.to_local()
        assert local.shape[0] == 64 // world  # really sharded: each process holds half the rows
        trainers.save_model(model, tokenizer, out)

        # the artifact's peak GPU memory is the largest over processes (the 7B alignment RL's ranks differed by 13 GB);
        # CUDA's counters faked per rank: this machine has none
        from stages.shared import hardware

        gib = 2 ** 30
        torch.cuda.is_available = torch.cuda.is_initialized = lambda: True
        torch.cuda.max_memory_allocated = lambda: (10 + 5 * rank) * gib
        torch.cuda.max_memory_reserved = lambda: (30 - 5 * rank) * gib
        assert hardware.peak_gpu_memory() == {"allocated": 10 + 5 * rank, "reserved": 30 - 5 * rank}
        assert hardware.peak_gpu_memory(over_processes=True) == {"allocated": 15, "reserved": 30}
    finally:
        dist.barrier()  # leave together: a process tearing gloo down while its peer still works can abort
        dist.destroy_process_group()
    _exit_without_teardown()


def test_fsdp_save_gathers_the_whole_model_and_writes_it_once(tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "model"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)

    reference, _ = _model_and_tokenizer()
    saved = AutoModelForCausalLM.from_pretrained(out)
    expected = reference.state_dict()
    got = saved.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert saved.config.architectures == ["Qwen3ForCausalLM"]  # not FSDP2's FSDPQwen3ForCausalLM
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert (out / "tokenizer.json").is_file()


def _reference_worker(rank: int, world: int, store: str, checkpoint: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from stages.shared import trainers

        model = _shard(_model_and_tokenizer()[0], world)
        trainers.save_reference(model, Path(checkpoint))
        dist.barrier()
        with torch.no_grad():  # a resumed trainer's reference: the initial weights, here zeros
            for param in model.parameters():
                param.to_local().zero_()
        trainers.load_reference(model, Path(checkpoint), sync_steps=2)
        _assert_whole_state_is(model, _model_and_tokenizer()[0].state_dict(), rank)
    finally:
        dist.barrier()  # leave together: a process tearing gloo down while its peer still works can abort
        dist.destroy_process_group()
    _exit_without_teardown()


def test_fsdp_reference_checkpoint_gathers_once_and_loads_back_into_the_shards(tmp_path):
    """GRPO's reference under FSDP (trainers.save_reference / load_reference): gathered whole into the checkpoint by
    the main process, and loaded back into each process's shards on a resume."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    checkpoint = tmp_path / "checkpoint-2"
    mp.spawn(_reference_worker, args=(2, str(tmp_path / "store"), str(checkpoint)), nprocs=2, join=True)
    from stages.shared import trainers

    saved = torch.load(checkpoint / trainers.REFERENCE_FILE, weights_only=True)
    expected = _model_and_tokenizer()[0].state_dict()
    assert set(saved) == set(expected) and all(torch.equal(saved[k], v) for k, v in expected.items())
    assert [p.name for p in checkpoint.iterdir()] == [trainers.REFERENCE_FILE]  # no temporary file left


def _bf16_reference_worker(rank: int, world: int, store: str, checkpoint: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        plugin.set_mixed_precision("bf16")  # what `accelerate launch --mixed_precision bf16` gives FSDP2
        mesh = init_device_mesh("cpu", (world,))
        ids = torch.tensor([[3, 5, 7, 9, 11, 13, 2, 4], [4, 6, 8, 10, 12, 14, 16, 18]])
        logits = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=plugin.mixed_precision_policy)
            fully_shard(model, mesh=mesh, mp_policy=plugin.mixed_precision_policy)
            with torch.no_grad():
                logits[dtype] = model(input_ids=ids).logits
        assert torch.equal(logits[torch.float32], logits[torch.bfloat16])
        assert logits[torch.float32].abs().sum() > 0
    finally:
        dist.barrier()  # leave together: a process tearing gloo down while its peer still works can abort
        dist.destroy_process_group()
    _exit_without_teardown()


def test_under_fsdp_bf16_mixed_precision_a_bf16_reference_gives_the_fp32_ones_logits(tmp_path):
    """Why trainers.grpo_args loads GRPO's reference in bf16 under FSDP: accelerate's bf16 policy casts every gathered
    parameter to bf16 for the forward, so the fp32 checkpoint stored in bf16 computes the same logits bit for bit."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    model, tokenizer = _model_and_tokenizer(seed=3)
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    mp.spawn(_bf16_reference_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "policy")), nprocs=2, join=True)


def _load_worker(rank: int, world: int, store: str, checkpoint: str, env: dict, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    os.environ.update(env)  # what accelerate launch gives each process of a multi_gpu stage
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        got = model.state_dict()
        same = all(torch.equal(got[k].cpu(), v) for k, v in load_file(Path(checkpoint) / "model.safetensors").items())
        Path(out, f"rank{rank}").write_text("whole" if same else "not the checkpoint")
    finally:
        dist.barrier()
        dist.destroy_process_group()
    _exit_without_teardown()


def test_every_process_of_a_multi_gpu_stage_loads_the_whole_checkpoint(tmp_path, monkeypatch):
    """A model a stage (or TRL) loads itself, beside the policy that accelerate prepares: GRPO's reference, the
    alignment RL's reward models. Under accelerate's default FSDP loading only the first process got the weights
    (on 2 GPUs, GRPO's KL to its reference was 0.78 at step 1, where it is 0)."""
    import torch.multiprocessing as mp
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    from omegaconf import OmegaConf

    from pipeline import runner
    from pipeline.plan import compose_config

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    hw = OmegaConf.to_container(compose_config(["hardware=multi_gpu"]).hardware)
    cmd = runner.launch_command(hw, str(tmp_path / "spec.json"))
    launched = prepare_multi_gpu_env(launch_command_parser().parse_args(cmd[3:]))
    env = {k: v for k, v in launched.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    assert env["ACCELERATE_USE_FSDP"] == "true"

    checkpoint = tmp_path / "checkpoint"
    model, _ = _model_and_tokenizer()
    model.save_pretrained(checkpoint)
    mp.spawn(_load_worker, args=(2, str(tmp_path / "store"), str(checkpoint), env, str(tmp_path)), nprocs=2,
             join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["whole", "whole"]


TEXTS = {0: ["The answer is 4.", "Paris.", "I cannot help.", "t7 t8"], 1: ["No.", "Forty two.", "Yes, gladly.", "?"]}


def _rm_worker(rank: int, world: int, store: str, artifact: str, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # a process left waiting in a collective fails after this, instead of hanging the test
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        from pipeline.plan import compose_config
        from stages.shared import reward_models

        rm, tok, _ = reward_models.load(artifact, compose_config(["hardware=cpu"]).hardware)
        rows = rm.base_model.embed_tokens.weight.to_local().shape[0]
        scores = reward_models.score(rm, tok, ["q"] * 4, TEXTS[rank], batch_size=3)  # 2 batches on each process
        # the alignment RL scores only the general rows of each process's completions: 2 batches here, none there
        uneven = reward_models.score(rm, tok, ["q"] * 4 if rank == 0 else [], TEXTS[0] if rank == 0 else [],
                                     batch_size=3)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rows": rows, "scores": scores, "uneven": uneven}))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    _exit_without_teardown()


def test_reward_models_are_sharded_over_the_processes_and_score_as_one(tmp_path):
    """The alignment RL's reward models under several processes: each process holds half the weights (two whole 7B RMs
    would take 30 GB of every GPU) and scores its own completions exactly as the whole model does, also when the
    processes have different numbers of completions to score (the 7B alignment RL hung on that)."""
    import torch.multiprocessing as mp
    from transformers import Qwen3ForSequenceClassification

    from pipeline.plan import compose_config
    from stages import reward_model
    from stages.shared import reward_models

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    causal, tokenizer = _model_and_tokenizer()
    torch.manual_seed(1)
    rm = Qwen3ForSequenceClassification(causal.config.__class__(**{**causal.config.to_dict(), "num_labels": 1}))
    rm.save_pretrained(tmp_path / "rm_weights")
    tokenizer.save_pretrained(tmp_path / "rm_weights")
    artifact = tmp_path / "rm"
    artifact.mkdir()
    cfg = compose_config([f"reward_model.helpfulness.source={tmp_path / 'rm_weights'}"]).reward_model.helpfulness
    reward_model.run(cfg, {"model": tmp_path / "unused"}, artifact, tmp_path / "work")  # records the named RM

    mp.spawn(_rm_worker, args=(2, str(tmp_path / "store"), str(artifact), str(tmp_path)), nprocs=2, join=True)
    whole, tok, _ = reward_models.load(artifact, compose_config(["hardware=cpu"]).hardware)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["rows"] == 64 // 2  # sharded: half the embedding rows here
        assert got["scores"] == pytest.approx(reward_models.score(whole, tok, ["q"] * 4, TEXTS[rank]), abs=1e-5)
    # processes with different numbers of completions to score still finish, with the scores of their own
    assert json.loads((tmp_path / "rank1.json").read_text())["uneven"] == []
    assert json.loads((tmp_path / "rank0.json").read_text())["uneven"] == pytest.approx(
        reward_models.score(whole, tok, ["q"] * 4, TEXTS[0]), abs=1e-5)


def _final_weights_worker(rank: int, world: int, store: str, checkpoint: str, tied: bool) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from stages.shared import trainers

        # what a rerun builds before loading: other weights
        model = _shard(_model_and_tokenizer(tied=tied, seed=1)[0], world)
        trainers.load_final_weights(model, Path(checkpoint))
        _assert_whole_state_is(model, _model_and_tokenizer(tied=tied, seed=0)[0].state_dict(), rank)
    finally:
        dist.barrier()  # leave together: a process tearing gloo down while its peer still works can abort
        dist.destroy_process_group()
    _exit_without_teardown()


@pytest.mark.parametrize("tied", [False, True])
def test_a_finished_runs_weights_only_checkpoint_loads_into_the_shards(tmp_path, tied):
    """A rerun after a crash between the last step and publishing, under FSDP: the last checkpoint holds the weights
    only (model.safetensors as the trainer saves them, the tied LM head once), and load_final_weights puts them into
    each process's shards of a model built with other weights."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    checkpoint = tmp_path / "checkpoint-4"
    _model_and_tokenizer(tied=tied, seed=0)[0].save_pretrained(checkpoint)
    mp.spawn(_final_weights_worker, args=(2, str(tmp_path / "store"), str(checkpoint), tied), nprocs=2, join=True)
