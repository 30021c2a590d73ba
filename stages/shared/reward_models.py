"""Reward models at work: loading a reward-model artifact, what it reads (the summary or the whole response), batched
scoring, and a TRL reward function around it. The reward_model stage trains or records them; the alignment RL of
merged_sft_alignment scores with them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.shared import hardware
from stages.shared.errors import UserError

META_FILE = "reward_model.json"
SCOPES = ("summary", "whole")


def view(response: str, scope: str) -> str:
    """The part of a response a reward model scores: the summary after </think>, or the whole response."""
    from stages.shared import templates

    if scope not in SCOPES:
        raise UserError(f"reward model scope={scope!r}; use one of {', '.join(SCOPES)}")
    return templates.split_reasoning(response)[1] if scope == "summary" else response


def rm_text(tokenizer, question: str, response: str) -> str:
    """One (question, response) pair as the text a reward model reads: the tokenizer's chat template (user turn, then
    the assistant turn), or `question\\n\\nresponse` for a tokenizer without one; ends with the eos token. The same
    text in training and in scoring."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": response}], tokenize=False)
    else:
        text = f"{question}\n\n{response}"
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


@torch.no_grad()
def score(model, tokenizer, questions: list[str], responses: list[str], *, batch_size: int = 64,
          max_length: int | None = None) -> list[float]:
    """Scalar reward for each (question, response): batched, no grad; texts longer than max_length keep their end
    (the score is read at the last token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts = [rm_text(tokenizer, q, r) for q, r in zip(questions, responses)]
    batches = [texts[start:start + batch_size] for start in range(0, len(texts), batch_size)]
    filler = [rm_text(tokenizer, "", "")]  # what a process with fewer batches scores while its peers gather weights
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    out: list[float] = []
    try:
        for i in range(most_batches(len(batches), model, device)):
            enc = tokenizer(batches[i] if i < len(batches) else filler, return_tensors="pt", padding=True,
                            truncation=max_length is not None, max_length=max_length)
            output = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
            if i < len(batches):
                out.extend(output.logits[:, 0].float().tolist())
    finally:
        tokenizer.truncation_side = side
        if was_training:
            model.train()
    return out


def most_batches(batches: int, model, device) -> int:
    """The most batches any process scores. A sharded RM's forward gathers its weights from every process, so each
    process runs that many forwards, or the ones with fewer leave the others waiting forever. The counts differ in the
    alignment RL: each process scores its own completions, and only those of general prompts (the 7B run of the
    eleventh lease hung in its first step, benchmarks/README.md)."""
    from torch.distributed.fsdp import FSDPModule

    if _processes() == 1 or not isinstance(model, FSDPModule):
        return batches
    import torch.distributed as dist

    count = torch.tensor([batches], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def load(artifact_dir: str | Path, hw) -> tuple:
    """(model, tokenizer, meta) of a reward-model artifact: a trained save_pretrained dir or a recorded source.
    meta: {scope, max_length, ...} from reward_model.json."""
    from transformers import AutoModelForSequenceClassification

    from stages.shared import models

    artifact_dir = Path(artifact_dir)
    meta_path = artifact_dir / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{artifact_dir} is not a reward-model artifact ({META_FILE} missing); produce it with the "
                        f"reward_model stage")
    meta = json.loads(meta_path.read_text())
    source, revision = models.model_source(artifact_dir)
    local = Path(source).is_dir()
    # Scoring only: on a GPU the weights are bf16, the precision of the forward the RM trained with (bf16 autocast on
    # fp32 masters); fp32 would hold twice the memory beside the policy and vLLM (two 7B RMs: 60 GB per GPU)
    dtype = "bfloat16" if not hardware.on_cpu(hw) and hw["bf16"] else hardware.model_dtype(hw)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, revision=revision, num_labels=1, dtype=dtype, **({"local_files_only": True} if local else {}))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load reward model {source!r} as AutoModelForSequenceClassification: {e}") from None
    device = "cpu" if hardware.on_cpu(hw) else "cuda"
    if _processes() > 1:
        _shard(model, device)
    else:
        model.to(device)
    model.eval()
    tokenizer = models.load_tokenizer(source, revision=revision)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model, tokenizer, meta


def _processes() -> int:
    """Processes of torch.distributed's default group, which fully_shard's mesh spans (what hardware.world_size() reads
    through accelerate under `accelerate launch`; this asks the group itself, so it holds in any launcher)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _shard(model, device: str) -> None:
    """Under several processes (hardware=multi_gpu) each process keeps 1/N of the RM's weights, one FSDP2 unit per
    decoder layer gathered for its forward: two whole 7B RMs would take 30 GB of every GPU beside the policy and the
    vLLM engine. Every process then runs the same number of forwards (`most_batches`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (_processes(),))
    for layer in getattr(model.base_model, "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def last_user(prompt) -> str:
    """The question of a prompt: the prompt itself, or the last user turn of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


def rm_reward(name: str, model, tokenizer, *, scope: str, from_step: int = 0, batch_size: int = 64,
              max_length: int | None = None):
    """A reward function `name` scoring completions with a sequence-classification reward model (batched, no grad).

    scope `summary`: the RM reads only the part after </think>; `whole`: the entire response. Before step `from_step`
    (trainer_state.global_step) it returns None. Rows carry their question in the `question` column (else the last
    user turn of the prompt is used)."""
    from stages.shared import templates

    def reward(completions, prompts=None, question=None, trainer_state=None, **kwargs) -> list:
        if trainer_state is not None and trainer_state.global_step < from_step:
            return [None] * len(completions)
        texts = [view(templates.completion_text(c), scope) for c in completions]
        questions = question or [last_user(p) for p in prompts]
        return score(model, tokenizer, list(questions), texts, batch_size=batch_size,
                                  max_length=max_length)

    reward.__name__ = reward.__qualname__ = name
    return reward
