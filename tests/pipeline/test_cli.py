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


def test_artifacts_rm_removes_one_version_and_names_what_was_made_from_it(capsys, tmp_path, monkeypatch):
    from pipeline import artifacts
    from tests.pipeline.test_artifacts import make

    monkeypatch.setenv("R1FLOW_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "store"
    old = make(root, "cold_start_sft", {"model.bin": b"x" * 4096}, config={"lr": 1})
    kept = make(root, "cold_start_sft", {"model.bin": b"y"}, config={"lr": 2})
    grpo = make(root, "reasoning_grpo", {"model.bin": b"z"}, inputs={"model": f"cold_start_sft@{old}"})

    code, out, _ = run_cli(capsys, "artifacts", "rm", f"cold_start_sft@{old}", f"artifacts_root={root}")
    assert code == 0 and f"removed cold_start_sft@{old}" in out and f"reasoning_grpo@{grpo}" in out
    assert not artifacts.exists(root, "cold_start_sft", old) and not (root / "cold_start_sft" / old).exists()
    assert artifacts.exists(root, "cold_start_sft", kept) and artifacts.exists(root, "reasoning_grpo", grpo)
    assert not list((root / "cold_start_sft").glob(".lease-*"))  # the lease it took is released
    assert "(MISSING)" in artifacts.format_lineage(artifacts.lineage(root, "reasoning_grpo", grpo))


def test_artifacts_rm_needs_an_existing_version(capsys, tmp_path, monkeypatch):
    from tests.pipeline.test_artifacts import make

    monkeypatch.setenv("R1FLOW_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "store"
    version = make(root, "base", {"model.bin": b"x"})
    code, _, err = run_cli(capsys, "artifacts", "rm", "base", f"artifacts_root={root}")
    assert code == 2 and "NAME@VERSION" in err and "artifacts ls" in err  # a bare name would take the latest
    code, _, err = run_cli(capsys, "artifacts", "rm", "base@0123456789ab", f"artifacts_root={root}")
    assert code == 2 and "base@0123456789ab" in err and version in err  # names the versions there are
    assert (root / "base" / version / "manifest.json").exists()
