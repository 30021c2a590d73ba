"""Every length is checked against the model's context: capped with a log line, or a UserError naming the key."""
import logging

import pytest

from stages.shared import models
from stages.shared.errors import UserError


def test_context_length_is_the_configs_max_position_embeddings(real_models):
    assert models.context_length(real_models("qwen2.5-math-1.5b")) == 4096
    assert models.context_length(real_models("llama-3.1-8b")) == 131072


def test_a_length_past_the_context_is_capped_and_logged(caplog):
    with caplog.at_level(logging.WARNING):
        assert models.fit_to_context("cold_start_sft.max_length", 32768, 4096) == 4096
        assert models.fit_to_context("evaluate.max_tokens", 32768, 4096, prompt_tokens=96) == 4000
    assert "cold_start_sft.max_length=32768" in caplog.text and "4096" in caplog.text
    assert models.fit_to_context("evaluate.max_tokens", 100, 4096, prompt_tokens=96) == 100
    assert models.fit_to_context("evaluate.max_tokens", 100, None) == 100


def test_a_prompt_that_fills_the_context_names_the_key():
    with pytest.raises(UserError, match=r"rejection_sampling.max_tokens.*4096"):
        models.fit_to_context("rejection_sampling.max_tokens", 16, 4096, prompt_tokens=4096)
