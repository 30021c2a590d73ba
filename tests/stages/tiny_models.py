"""A random-init tiny model with a byte-level BPE tokenizer, for the generation, evaluation and rejection-sampling
tests (tests/stages is on sys.path through its conftest.py)."""

from __future__ import annotations

from pathlib import Path

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def make_tiny_model(out: Path, *, eos_first: bool = False, hidden: int = 64, layers: int = 2) -> Path:
    """A random-init Qwen3 (~0.2M params; head_dim 32, the smallest vLLM's CPU attention takes; untied lm_head) and a
    byte-level BPE tokenizer whose <think>/<answer> tags are ordinary added tokens. `eos_first`: the model always
    emits end-of-sequence at once (to test stopping)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    corpus = ["User: what is 2+3? Assistant: <think> 2 plus 3 is 5 </think> <answer> 5 </answer>"] * 5 + \
             [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE)
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    fast.save_pretrained(out)
    cfg = Qwen3Config(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=max(32, hidden // 4), intermediate_size=hidden * 4,
                      max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    if eos_first:  # residual dimension 0 dominated by a large positive constant; only eos reads it
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 1000.0
            model.lm_head.weight[fast.eos_token_id] = 0.0
            model.lm_head.weight[fast.eos_token_id, 0] = 100.0
    model.generation_config = GenerationConfig(eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model.save_pretrained(out)
    return out
