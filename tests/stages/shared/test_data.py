"""stages/shared/data.py: paths, file entries, and the errors a user sees for bad data."""
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stages.shared import data
from stages.shared.errors import UserError

ROOT = Path(__file__).resolve().parents[3]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_resolve_path():
    assert data.resolve_path("data/arith/rl_eval.jsonl") == ROOT / "data/arith/rl_eval.jsonl"
    assert data.PROJECT_ROOT == ROOT and (ROOT / "pyproject.toml").is_file()
    assert data.resolve_path("/tmp/x.jsonl") == Path("/tmp/x.jsonl")


def test_loads_embedded_file_relative_to_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative paths do not depend on the working directory
    rows = data.load_rows("data/arith/rl_eval.jsonl", ["prompt", "answer"], "rl_eval")
    assert len(rows) == 200 and rows[0]["id"] == "eval-0000"
    cfg = OmegaConf.create({"f": {"path": "data/arith/rl_eval.jsonl", "columns": {"question": "prompt"}}})
    rows = data.load_rows(cfg.f, ["question", "answer"], "rl_eval")  # DictConfig entries work as well
    assert rows[0]["question"] and "prompt" not in rows[0]


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(UserError) as e:
        data.load_rows("data/arith/nope.jsonl", ["prompt"], "rl_train")
    msg = str(e.value)
    assert str(ROOT / "data/arith/nope.jsonl") in msg
    assert "python data/arith/prepare.py" in msg and "data.files.rl_train" in msg
    with pytest.raises(UserError, match="reasoning_grpo.train_file"):
        data.load_rows(str(tmp_path / "x.jsonl"), ["prompt"], "reasoning_grpo.train_file")
    with pytest.raises(UserError, match="data.files.pretrain is not set"):
        data.load_rows(None, ["text"], "pretrain")


def test_bad_json_line_has_line_number(tmp_path):
    f = write(tmp_path / "bad.jsonl", ['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b", "answer": }'])
    with pytest.raises(UserError) as e:
        data.load_rows(str(f), ["prompt"], "rl_train")
    assert f"{f}:3" in str(e.value) and "not valid JSON" in str(e.value)


def test_missing_field_names_line_field_and_columns(tmp_path):
    f = write(tmp_path / "rows.jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "solution": "2"}'])
    with pytest.raises(UserError) as e:
        data.load_rows(str(f), ["prompt", "answer"], "rl_train")
    msg = str(e.value)
    assert f"{f}:2" in msg and "'answer'" in msg and "['prompt', 'solution']" in msg
    assert "data.files.rl_train.columns" in msg
    f2 = write(tmp_path / "null.jsonl", ['{"prompt": "a", "answer": null}'])
    with pytest.raises(UserError, match="missing required field 'answer'"):
        data.load_rows(str(f2), ["prompt", "answer"], "rl_train")


def test_column_mapping(tmp_path):
    f = write(tmp_path / "other.jsonl", [json.dumps({"problem": "What is 1 + 1?", "solution": "2", "extra": 1})])
    rows = data.load_rows({"path": str(f), "columns": {"prompt": "problem", "answer": "solution"}},
                          ["prompt", "answer"], "rl_train")
    assert rows == [{"prompt": "What is 1 + 1?", "answer": "2", "extra": 1}]
    with pytest.raises(UserError) as e:  # the mapping names a column the file does not have
        data.load_rows({"path": str(f), "columns": {"prompt": "question"}}, ["prompt"], "rl_train")
    assert "'question'" in str(e.value) and "data.files.rl_train.columns" in str(e.value) and "problem" in str(e.value)
    with pytest.raises(UserError, match="unknown keys"):
        data.load_rows({"path": str(f), "colums": {}}, ["prompt"], "rl_train")


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    f = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": None}]), f)
    with pytest.raises(UserError, match="row 1: missing required field 'answer'"):
        data.load_rows({"path": str(f), "columns": {"prompt": "problem"}}, ["prompt", "answer"], "rl_eval")
    assert data.load_rows(str(f), ["problem"], "rl_eval")[0]["problem"] == "p1"


def test_hub_offline_fails_with_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        data.load_rows({"hub": "someone/not-cached-dataset-xyz", "split": "train", "columns": {"prompt": "q"}},
                       ["prompt"], "rl_train")
    msg = str(e.value)
    assert "data.files.rl_train" in msg and "someone/not-cached-dataset-xyz" in msg and "local" in msg


def test_hub_unreachable_is_detected_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert data.hub_reachable() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.hub_reachable() is False


def test_write_jsonl_roundtrip(tmp_path):
    rows = [{"text": "Сколько будет 2 + 2? 猫"}, {"text": "b"}]
    p = data.write_jsonl(tmp_path / "sub" / "out.jsonl", rows)
    assert data.load_rows(str(p), ["text"], "pretrain") == rows
    assert not list((tmp_path / "sub").glob("*.tmp"))
