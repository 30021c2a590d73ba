"""The command line on bad input: a clear message, a non-zero exit, nothing written."""

import pytest

from pipeline.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_stage(capsys, tmp_path):
    code, _, err = run_cli(capsys, "stage", "nope", f"artifacts_root={tmp_path}")
    assert code == 2 and "unknown stage 'nope'" in err and "reasoning_grpo" in err
    assert list(tmp_path.iterdir()) == []


def test_stage_with_missing_input(capsys, tmp_path):
    code, _, err = run_cli(capsys, "stage", "reasoning_grpo", f"artifacts_root={tmp_path}")
    assert code == 2 and "needs input 'model' from stage 'cold_start_sft'" in err


def test_config_typo(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "reasoning_grpo.lrr=1", f"artifacts_root={tmp_path}")
    assert code == 2 and "reasoning_grpo.lrr" in err


def test_unwritable_artifacts_root(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "run", "size=smoke", f"artifacts_root={blocker}/store")
    assert code == 2 and "artifacts_root" in err


def test_missing_artifact(capsys, tmp_path):
    code, _, err = run_cli(capsys, "artifacts", "show", "base@0123456789ab", f"artifacts_root={tmp_path}")
    assert code == 2 and "base@0123456789ab" in err


def test_status_lists_every_stage_as_missing(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "status", "recipe=r1_zero", f"artifacts_root={tmp_path}")
    assert code == 0
    lines = [line.split() for line in out.splitlines()[1:]]
    assert [line[0] for line in lines] == ["base", "eval_base", "reasoning_grpo", "eval_reasoning_grpo", "report"]
    assert {line[2] for line in lines} == {"missing"}


def test_config_prints_the_composed_config(capsys):
    code, out, _ = run_cli(capsys, "config", "model=qwen2.5-math-1.5b")
    assert code == 0 and "source: Qwen/Qwen2.5-Math-1.5B" in out and "epsilon: 10.0" in out


def test_report_takes_overrides_without_a_ref(capsys, tmp_path):
    code, _, err = run_cli(capsys, "report", f"artifacts_root={tmp_path}")
    assert code == 2 and f"no complete 'report' artifact in {tmp_path}" in err


def test_overrides_after_a_flag(capsys, tmp_path):
    code, _, err = run_cli(capsys, "stage", "cold_start_sft", "--force", f"artifacts_root={tmp_path}", "size=smoke")
    assert code == 2 and "needs input 'model' from stage 'base'" in err and str(tmp_path) in err


def test_stray_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["stage", "base", "--force", "--frobnicate"])
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err
