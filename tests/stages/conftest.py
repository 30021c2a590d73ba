"""Fixtures shared by the stage tests."""

import pytest

from pipeline.plan import compose_config


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory):
    """A size=smoke base checkpoint (tiny model, 30 pre-training steps), built once per test session."""
    from stages import base

    out = tmp_path_factory.mktemp("smoke_base")
    base.run(compose_config(["size=smoke", "base.eval_samples=0"]).base, {}, out, tmp_path_factory.mktemp("work"))
    return out
