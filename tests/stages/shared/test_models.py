"""stages/shared/models.py: the offline tokenizer and model, Auto-class round trips, loading errors, checkpoint refs."""
import json
from pathlib import Path

import pytest
import torch

from pipeline.plan import compose_config
from stages.shared import models
from stages.shared.errors import UserError

_COMPOSED = compose_config([])  # model=tiny, model@student=tiny_student; their tokenizer corpus is data.tokenizer_corpus
TINY, STUDENT = _COMPOSED.model, _COMPOSED.student
MSGS = [{"role": "user", "content": "What is 47 + 38?"},
        {"role": "assistant", "content": "<think>\n7+8=15 write 5 carry 1\n4+3+1=8\nSo 47+38=85\n</think>\n"
                                         "The answer is \\boxed{85}"}]
TEXTS = ["What is 47 + 38?", "Сколько будет 120 - 7? Ответ: 113", "猫 and 🙂, tabs\tand  double  spaces\n",
         "<think> 7+8=15 </think> <answer> 15 </answer>", "", "ÿ\x00\x7f"]


@pytest.fixture(scope="module")
def tok():
    return models.build_tokenizer(list(TINY.tokenizer.corpus), int(TINY.tokenizer.vocab_size))


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    torch.manual_seed(0)
    model = models.build_model(TINY.architecture, tok)
    d = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, d


def test_tokenizer_size_and_determinism(tok):
    assert len(tok) == 512
    again = models.build_tokenizer(list(TINY.tokenizer.corpus), 512)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_digits_are_single_tokens(tok):
    for d in "0123456789":
        assert len(tok(d)["input_ids"]) == 1
    ids = tok("12345+678")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("12345+678")
    assert all(len(tok.decode([i])) == 1 for i in tok(" 907 ")["input_ids"])


def test_tags_are_single_non_special_tokens(tok):
    for tag in models.THINK_TAGS:
        ids = tok(tag)["input_ids"]
        assert len(ids) == 1 and ids[0] not in tok.all_special_ids
        assert tok.decode(ids, skip_special_tokens=True) == tag  # survives GRPO's skip_special_tokens decode
    ids = tok("x <think> y </think> <answer> 5 </answer>")["input_ids"]
    assert sum(i in tok.convert_tokens_to_ids(models.THINK_TAGS) for i in ids) == 4


def test_special_tokens(tok):
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.eos_token_id != tok.pad_token_id
    for t in ("<|user|>", "<|assistant|>", "<|system|>"):
        assert tok.convert_tokens_to_ids(t) in tok.all_special_ids
    assert tok.unk_token is None


def test_roundtrip_any_text(tok):
    for text in TEXTS:
        assert tok.decode(tok(text)["input_ids"]) == text
    merged = [t for t in tok.get_vocab() if len(t) > 1 and not t.startswith("<")]
    assert len(merged) > 150  # BPE learned merges despite the full byte alphabet
    assert len(tok("The answer is")["input_ids"]) == 3


def test_chat_template_and_assistant_mask(tok):
    text = tok.apply_chat_template(MSGS, tokenize=False)
    assert text == f"<|user|>{MSGS[0]['content']}<|end|><|assistant|>{MSGS[1]['content']}<|end|>"
    assert tok.apply_chat_template(MSGS[:1], tokenize=False, add_generation_prompt=True).endswith("<|assistant|>")
    out = tok.apply_chat_template(MSGS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(kept) == MSGS[1]["content"] + "<|end|>"  # content plus end-of-turn, nothing of the prompt
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("cfg,params", [(TINY, 1_115_520), (STUDENT, 504_672)])
def test_build_model(tok, cfg, params):
    torch.manual_seed(0)
    model = models.build_model(cfg.architecture, tok)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.head_dim == cfg.architecture.head_dim


def test_save_load_roundtrip_with_auto_classes(tok, saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, d = saved
    assert (d / "model.safetensors").is_file()
    tok2 = AutoTokenizer.from_pretrained(d)
    assert type(tok2) is type(tok) and tok2.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    for text in TEXTS:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.apply_chat_template(MSGS, tokenize=False) == tok.apply_chat_template(MSGS, tokenize=False)
    m2 = AutoModelForCausalLM.from_pretrained(d, use_safetensors=True)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = tok2.apply_chat_template(MSGS[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    g1 = model.generate(**x, max_new_tokens=6, do_sample=False)
    g2 = m2.generate(**x, max_new_tokens=6, do_sample=False)
    assert g1.shape[1] > x["input_ids"].shape[1] and torch.equal(g1, g2)


def test_load_functions_and_model_source(saved, tmp_path):
    model, d = saved
    assert models.model_source(d) == (str(d), None)
    m = models.load_model(str(d), dtype="float32")
    t = models.load_tokenizer(str(d))
    assert type(m).__name__ == "Qwen3ForCausalLM" and m.dtype == torch.float32 and t.pad_token == "<|pad|>"
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    models.write_model_ref(ref_dir, "Qwen/Qwen2.5-Math-1.5B", "abc123")
    assert json.loads((ref_dir / "model_ref.json").read_text()) == {"source": "Qwen/Qwen2.5-Math-1.5B",
                                                                     "revision": "abc123"}
    assert models.model_source(ref_dir) == ("Qwen/Qwen2.5-Math-1.5B", "abc123")
    with pytest.raises(UserError, match="not a model checkpoint"):
        models.model_source(tmp_path / "empty")
    with pytest.raises(UserError, match="dtype=.float13"):
        models.load_model(str(d), dtype="float13")
    with pytest.raises(UserError, match="no such directory"):
        models.load_model("./no/such/dir")


def test_pad_falls_back_to_eos(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|end|>")
    bare.save_pretrained(tmp_path)
    t = models.load_tokenizer(str(tmp_path))
    assert t.pad_token == "<|end|>" and t.pad_token_id == t.eos_token_id


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(UserError) as e:
            load("someone/not-cached-model-xyz", revision="main")
        assert "model.source" in str(e.value) and "local" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(UserError, match="model.source"):
        models.load_model("build")
