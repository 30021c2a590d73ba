"""Real chat templates (tests/fixtures/real_models): the end-of-turn token, the loss mask of chat SFT, prompts as
token ids, the think-prefilled generation prompt."""
import pytest
from datasets import Dataset

from pipeline.plan import compose_config
from stages.shared import models, templates, trainers
from stages.shared.errors import UserError

FAMILIES = ["qwen2.5-math-1.5b", "qwen2.5-7b-instruct", "llama-3.1-8b", "deepseek-r1-distill-qwen-1.5b"]
END_OF_TURN = {"qwen2.5-math-1.5b": "<|im_end|>", "qwen2.5-7b-instruct": "<|im_end|>", "llama-3.1-8b": "<|eot_id|>",
               "deepseek-r1-distill-qwen-1.5b": "<｜end▁of▁sentence｜>"}
ANSWER = "<think>\nSo 2+3=5\n</think>\nThe answer is \\boxed{5}"


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_token_is_the_templates(real_models, family):
    tok = models.load_tokenizer(real_models(family))
    assert templates.end_of_turn_token(tok) == END_OF_TURN[family]


def test_end_of_turn_of_the_built_tokenizer_is_its_eos(smoke_base):
    tok = models.load_tokenizer(smoke_base)
    assert templates.end_of_turn_token(tok) == tok.eos_token


def _sft_trainer(path, tmp_path, **overrides):
    model, tok = models.load_model(path), models.load_tokenizer(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = compose_config(["size=smoke", "cold_start_sft.max_length=4096", "cold_start_sft.eval_samples=0",
                          *[f"cold_start_sft.{k}={v}" for k, v in overrides.items()]]).cold_start_sft
    data = Dataset.from_list([{"messages": [{"role": "user", "content": "What is 2+3?"},
                                            {"role": "assistant", "content": ANSWER}]}] * 2)
    return trainers.sft_trainer(cfg, model, tok, data, tmp_path, name="cold_start_sft"), tok


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_sft_puts_the_loss_on_exactly_the_assistant_turn(real_models, family, tmp_path):
    trainer, tok = _sft_trainer(real_models(family), tmp_path)
    row = trainer.train_dataset[0]
    mask = [label != -100 for label in row["labels"]]
    trained = tok.decode([t for t, m in zip(row["input_ids"], mask) if m])
    untrained = tok.decode([t for t, m in zip(row["input_ids"], mask) if not m])
    eot = END_OF_TURN[family]
    # the assistant's text and its end-of-turn token are trained, nothing of the user's turn or the system prompt
    assert ANSWER in trained and eot in trained and trained.index(eot) > trained.index(ANSWER)
    assert trained[trained.index(eot) + len(eot):].strip() == ""
    assert "2+3?" in untrained and "2+3?" not in trained
    assert trained.replace(ANSWER, "").replace(eot, "").strip() in ("", "<｜Assistant｜>")  # R1-Distill's own tag
    # and the trainer stops generation there: tokenizer EOS and generation_config
    eot_id = tok.convert_tokens_to_ids(eot)
    assert trainer.processing_class.eos_token == eot
    ids = trainer.model.generation_config.eos_token_id
    assert eot_id in (ids if isinstance(ids, list) else [ids])


def test_unsplittable_conversation_with_an_unpatchable_template_names_the_template_and_fix(real_models):
    tok = models.load_tokenizer(real_models("qwen2.5-math-1.5b"))
    data = Dataset.from_list([{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}])
    with pytest.raises(UserError, match=r"cold_start_sft.assistant_only_loss.*chat template of .*qwen2.5-math-1.5b.*generation"):
        trainers.assistant_loss_format(data, tok, "cold_start_sft")


def test_llama_prompts_carry_one_bos(real_models):
    tok = models.load_tokenizer(real_models("llama-3.1-8b"))
    ids = templates.prompt_token_ids("What is 2+3?", "r1", tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert templates.prompt_token_ids("What is 2+3?", "r1_zero", tok).count(tok.bos_token_id) == 1


def test_r1_distill_template_is_think_prefilled(real_models):
    assert templates.think_prefilled(models.load_tokenizer(real_models("deepseek-r1-distill-qwen-1.5b")), "r1")
    assert not templates.think_prefilled(models.load_tokenizer(real_models("qwen2.5-math-1.5b")), "r1")


def test_a_llama_judge_gets_one_bos(real_models):
    from stages.shared import judge

    tok = models.load_tokenizer(real_models("llama-3.1-8b"))

    class Recorder:  # the generator's interface: records what the engines would be given
        def generate(self, prompts, **kw):
            self.prompts = prompts
            return [[{"text": "yes"}] for _ in prompts]

    gen = Recorder()
    assert judge.judge_verdicts(gen, [("42", "It is 42.")], tokenizer=tok) == [True]
    ids = gen.prompts[0]
    assert isinstance(ids, list) and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert "Reference answer: 42" in tok.decode(ids)
