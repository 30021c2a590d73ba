"""The artifact store on real files in tmp_path, plus a memory:// round trip for the fsspec path."""

import hashlib
import json
import re
import shutil
import subprocess
import uuid

import fsspec
import pytest

from pipeline import artifacts as A
from stages.shared.errors import UserError

T0 = "2024-01-01T00:00:00+00:00"


def make(root, name, files, *, version=None, inputs=None, config=None, ended_at="2024-01-01T01:00:00Z", **kw):
    """Stage name with files {relpath: bytes} and publish it the way the runner does."""
    config = config if config is not None else {"lr": 1e-5}
    inputs = inputs or {}
    version = version or A.compute_version(f"stages.{name}", config, {r: v.split("@")[1] for r, v in inputs.items()})
    d = A.staging_dir(root, name, version)
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    kw.setdefault("kind", "dataset")
    A.publish(root, name, version, d, stage=f"stages.{name}", inputs=inputs, config=config, metrics={"n": 1},
              started_at=T0, ended_at=ended_at, **kw)
    return version


@pytest.fixture
def root(tmp_path):
    return tmp_path / "artifacts"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("R1FLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- versions and refs -----------------------------------------------------------------------------------------------


def test_version_is_stable_and_changes_with_every_input():
    v = A.compute_version("stages.sft", {"lr": 1e-5, "opt": {"b1": 0.9, "b2": 0.95}}, {"model": "abc"})
    assert re.fullmatch(r"[0-9a-f]{12}", v)
    # Key order is not part of the identity.
    assert v == A.compute_version("stages.sft", {"opt": {"b2": 0.95, "b1": 0.9}, "lr": 1e-5}, {"model": "abc"})
    assert v == A.compute_version("stages.sft", {"lr": 1e-5, "opt": {"b1": 0.9, "b2": 0.95}}, {"model": "abc"}, {})
    others = {
        A.compute_version("stages.grpo", {"lr": 1e-5, "opt": {"b1": 0.9, "b2": 0.95}}, {"model": "abc"}),
        A.compute_version("stages.sft", {"lr": 2e-5, "opt": {"b1": 0.9, "b2": 0.95}}, {"model": "abc"}),
        A.compute_version("stages.sft", {"lr": 1e-5, "opt": {"b1": 0.8, "b2": 0.95}}, {"model": "abc"}),
        A.compute_version("stages.sft", {"lr": 1e-5, "opt": {"b1": 0.9, "b2": 0.95}}, {"model": "abd"}),
        A.compute_version("stages.sft", {"lr": 1e-5, "opt": {"b1": 0.9, "b2": 0.95}}, {"base": "abc"}),
        A.compute_version("stages.sft", {"lr": 1e-5, "opt": {"b1": 0.9, "b2": 0.95}}, {"model": "abc"},
                          {"train_file": "f00d"}),
    }
    assert v not in others and len(others) == 6


def test_parse_ref():
    assert A.parse_ref("sft@abc123") == ("sft", "abc123")
    assert A.parse_ref("sft") == ("sft", None)
    for bad in ("", "@abc", "sft@"):
        with pytest.raises(UserError, match="name@version"):
            A.parse_ref(bad)


# --- publish ---------------------------------------------------------------------------------------------------------


def test_publish_creates_complete_artifact_with_correct_hashes(root):
    files = {"model.bin": b"\x00\x01" * 1000, "sub/dir/notes.txt": b"hello", "a.json": b"{}"}
    staged = A.staging_dir(root, "sft", "v1")
    assert staged.parent == root / "sft" and staged.name.startswith(".staging-v1-")
    for rel, data in files.items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_bytes(data)
    assert not A.exists(root, "sft", "v1")

    path = A.publish(root, "sft", "v1", staged, kind="checkpoint", stage="stages.sft",
                     inputs={"model": {"name": "base", "version": "b0"}, "data": "prep@p0"}, config={"lr": 1e-5},
                     metrics={"loss": 0.5}, started_at=T0, ended_at="2024-01-01T02:00:00Z", extra={"note": "x"})

    assert path == root / "sft" / "v1" and A.exists(root, "sft", "v1")
    assert not staged.exists()
    m = json.loads((path / "manifest.json").read_text())
    assert m == A.read_manifest(root, "sft", "v1")
    assert m["files"] == [{"path": rel, "size": len(files[rel]), "sha256": hashlib.sha256(files[rel]).hexdigest()}
                          for rel in sorted(files)]
    assert (m["name"], m["kind"], m["version"], m["stage"]) == ("sft", "checkpoint", "v1", "stages.sft")
    assert m["inputs"] == {"model": {"name": "base", "version": "b0"}, "data": {"name": "prep", "version": "p0"}}
    assert m["config"] == {"lr": 1e-5} and m["metrics"] == {"loss": 0.5} and m["note"] == "x"
    assert m["started_at"] == "2024-01-01T00:00:00.000000+00:00"
    assert m["ended_at"] == "2024-01-01T02:00:00.000000+00:00"
    assert set(m["libraries"]) == {"torch", "transformers", "trl", "peft", "datasets", "vllm"}
    assert m["libraries"]["datasets"]  # installed in the venv
    assert m["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", m["git_commit"])
    assert A.load(root, "sft", "v1") == path
    assert snapshot(path) == {**files, "manifest.json": (path / "manifest.json").read_bytes()}


def test_git_commit_marks_dirty(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    (repo / "f").write_text("1")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    clean = A.git_commit(repo)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (repo / "untracked").write_text("ignored")
    assert A.git_commit(repo) == clean
    (repo / "f").write_text("2")
    assert A.git_commit(repo) == clean + "-dirty"
    assert A.git_commit(tmp_path / "nowhere") is None


def test_second_version_leaves_first_untouched(root):
    v1 = make(root, "sft", {"w": b"one"}, config={"lr": 1}, ended_at="2024-01-01T01:00:00Z")
    before = snapshot(root / "sft" / v1)
    v2 = make(root, "sft", {"w": b"two", "extra": b"e"}, config={"lr": 2}, ended_at="2024-01-01T03:00:00Z")
    assert v1 != v2
    assert snapshot(root / "sft" / v1) == before
    assert [m["version"] for m in A.list_versions(root, "sft")] == [v1, v2]
    assert A.latest(root, "sft") == v2
    assert (A.load(root, "sft", v2) / "w").read_bytes() == b"two"


def test_publish_existing_version_keeps_it(root):
    v = make(root, "sft", {"w": b"first"})
    before = snapshot(root / "sft" / v)
    staged = A.staging_dir(root, "sft", v)
    (staged / "w").write_bytes(b"second")
    path = A.publish(root, "sft", v, staged, kind="dataset", stage="s", inputs={}, config={}, metrics={},
                     started_at=T0, ended_at=T0)
    assert path == root / "sft" / v
    assert snapshot(path) == before
    assert not staged.exists()


def test_publish_rejects_misuse(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = dict(kind="dataset", stage="s", inputs={}, config={}, metrics={}, started_at=T0, ended_at=T0)
    with pytest.raises(ValueError, match="staging_dir"):
        A.publish(root, "sft", "v1", elsewhere, **args)
    staged = A.staging_dir(root, "sft", "v1")
    with pytest.raises(ValueError, match="kind"):
        A.publish(root, "sft", "v1", staged, **{**args, "kind": "model"})
    with pytest.raises(ValueError, match="metrics"):
        A.publish(root, "sft", "v1", staged, **args, extra={"metrics": {}})
    with pytest.raises(ValueError, match="plain path component"):
        A.staging_dir(root, "../x", "v1")
    assert not A.exists(root, "sft", "v1")


# --- crashes ---------------------------------------------------------------------------------------------------------


def test_crashed_staging_is_ignored_and_cleanable(root):
    v = make(root, "sft", {"w": b"ok"})
    # A crash after the manifest was written into staging but before the rename: still not an artifact.
    crashed = A.staging_dir(root, "sft", "v2")
    (crashed / "w").write_bytes(b"half")
    (crashed / "manifest.json").write_text(json.dumps({"version": "v2", "ended_at": "2099-01-01T00:00:00+00:00"}))
    lonely = A.staging_dir(root, "grpo", "g1")  # a name with nothing but a crashed run
    (lonely / "w").write_bytes(b"half")

    assert not A.exists(root, "sft", "v2")
    assert [m["version"] for m in A.list_versions(root, "sft")] == [v]
    assert A.latest(root, "sft") == v
    assert A.latest(root, "grpo") is None
    assert list(A.list_artifacts(root)) == ["sft"]

    # Only the staging dirs of the version whose lease the caller holds: the others may belong to live runs.
    other = A.staging_dir(root, "sft", "v22")
    assert A.clean_staging(root, "sft", "v2") == [str(crashed)]
    assert not crashed.exists() and lonely.exists() and other.exists()
    assert A.clean_staging(root, "grpo", "g1") == [str(lonely)]
    assert A.exists(root, "sft", v)


def test_partial_final_dir_is_not_complete_and_is_replaced(root):
    final = root / "sft" / "v1"
    final.mkdir(parents=True)
    (final / "stale.bin").write_bytes(b"from a crash")
    assert not A.exists(root, "sft", "v1")
    assert A.list_versions(root, "sft") == []
    with pytest.raises(UserError, match="sft@v1"):
        A.load(root, "sft", "v1")

    make(root, "sft", {"w": b"good"}, version="v1")
    assert A.exists(root, "sft", "v1")
    assert set(snapshot(final)) == {"w", "manifest.json"}
    A.load(root, "sft", "v1")  # verifies


def test_remove_deletes_artifact(root):
    v = make(root, "sft", {"w": b"x"})
    A.remove(root, "sft", v)
    assert not A.exists(root, "sft", v) and not (root / "sft" / v).exists()


# --- tampering and missing artifacts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tamper, file, what", [
    ("flip", "w.bin", "sha256"),
    ("grow", "w.bin", "bytes"),
    ("add", "sneaky.txt", "not in the manifest"),
    ("delete", "sub/x.txt", "missing"),
])
def test_load_detects_tampering(root, tamper, file, what):
    v = make(root, "sft", {"w.bin": b"abcdef", "sub/x.txt": b"x"})
    d = root / "sft" / v
    if tamper == "flip":
        (d / "w.bin").write_bytes(b"abcdeg")
    elif tamper == "grow":
        (d / "w.bin").write_bytes(b"abcdefg")
    elif tamper == "add":
        (d / "sneaky.txt").write_text("?")
    else:
        (d / "sub/x.txt").unlink()

    with pytest.raises(UserError) as e:
        A.load(root, "sft", v)
    msg = str(e.value)
    assert f"sft@{v}" in msg and file in msg and what in msg
    assert f"delete {d}" in msg and "r1flow stage sft --force" in msg
    if tamper == "flip":
        assert hashlib.sha256(b"abcdeg").hexdigest() in msg and hashlib.sha256(b"abcdef").hexdigest() in msg
    if tamper == "grow":
        assert "7 bytes" in msg and "says 6" in msg
    assert A.load(root, "sft", v, verify=False) == d


def test_missing_artifact_lists_versions(root):
    with pytest.raises(UserError, match="no versions of sft exist"):
        A.load(root, "sft", "nope")
    v1 = make(root, "sft", {"w": b"1"}, config={"a": 1})
    v2 = make(root, "sft", {"w": b"2"}, config={"a": 2}, ended_at="2024-01-02T00:00:00Z")
    with pytest.raises(UserError) as e:
        A.load(root, "sft", "nope")
    assert "sft@nope" in str(e.value) and f"{v1}, {v2}" in str(e.value)
    with pytest.raises(UserError, match="sft@nope"):
        A.read_manifest(root, "sft", "nope")


def test_unwritable_root(tmp_path):
    (tmp_path / "afile").write_text("a regular file, so nothing can be created under it")
    bad = tmp_path / "afile" / "sub"
    for call in (lambda: A.check_writable(bad), lambda: A.staging_dir(bad, "sft", "v1")):
        with pytest.raises(UserError) as e:
            call()
        assert str(bad) in str(e.value) and "artifacts_root" in str(e.value)
    A.check_writable(tmp_path / "fine")  # and a good one passes


# --- lineage ---------------------------------------------------------------------------------------------------------


def test_lineage_of_three_levels(root):
    data = make(root, "data", {"d": b"d"})
    sft = make(root, "sft", {"m": b"m"}, kind="checkpoint", inputs={"dataset": f"data@{data}"})
    ev = make(root, "eval", {"e": b"e"}, kind="evaluation",
              inputs={"model": f"sft@{sft}", "dataset": f"data@{data}", "judge": "rm@gone"})

    tree = A.lineage(root, "eval", ev)
    assert (tree["name"], tree["version"], tree["kind"], tree["missing"]) == ("eval", ev, "evaluation", False)
    assert list(tree["inputs"]) == ["dataset", "judge", "model"]
    assert tree["inputs"]["model"]["inputs"]["dataset"]["version"] == data
    assert tree["inputs"]["model"]["inputs"]["dataset"]["inputs"] == {}
    assert tree["inputs"]["judge"]["missing"] is True

    assert A.format_lineage(tree) == "\n".join([
        f"eval@{ev} (evaluation, stages.eval)",
        f"├── dataset: data@{data} (dataset, stages.data)",
        "├── judge: rm@gone (MISSING)",
        f"└── model: sft@{sft} (checkpoint, stages.sft)",
        f"    └── dataset: data@{data} (dataset, stages.data)",
    ])


def test_list_artifacts(root):
    assert A.list_artifacts(root) == {}
    a = make(root, "a", {"x": b"1"})
    b = make(root, "b", {"x": b"2"})
    got = A.list_artifacts(root)
    assert {k: [m["version"] for m in v] for k, v in got.items()} == {"a": [a], "b": [b]}


# --- fsspec ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def mem_root():
    url = f"memory://r1flow-test-{uuid.uuid4().hex}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_memory_roundtrip(mem_root, cache):
    fs, base = fsspec.core.url_to_fs(mem_root)
    files = {"model.bin": b"\x07" * 3000, "sub/cfg.json": b"{}"}
    v = make(mem_root, "sft", files, kind="checkpoint")

    assert A.exists(mem_root, "sft", v)
    assert fs.cat_file(f"{base}/sft/{v}/model.bin") == files["model.bin"]  # really uploaded
    assert [m["version"] for m in A.list_versions(mem_root, "sft")] == [v]
    assert A.latest(mem_root, "sft") == v and list(A.list_artifacts(mem_root)) == ["sft"]
    assert A.artifact_uri(mem_root, "sft", v) == f"memory://{base}/sft/{v}"

    # publish left the staged copy in the cache; a fresh machine (empty cache) downloads.
    assert A.load(mem_root, "sft", v) == cache / "sft" / v
    shutil.rmtree(cache)
    d = A.load(mem_root, "sft", v)
    assert d == cache / "sft" / v
    assert snapshot(d) == {**files, "manifest.json": (d / "manifest.json").read_bytes()}
    assert json.loads((d / "manifest.json").read_text()) == A.read_manifest(mem_root, "sft", v)

    # A damaged cache copy is fetched again rather than blamed on the artifact.
    (d / "model.bin").write_bytes(b"junk")
    assert (A.load(mem_root, "sft", v) / "model.bin").read_bytes() == files["model.bin"]

    # Tampering in the store itself is reported against the remote URL.
    fs.pipe_file(f"{base}/sft/{v}/sub/cfg.json", b"[]")
    shutil.rmtree(cache)
    with pytest.raises(UserError) as e:
        A.load(mem_root, "sft", v)
    assert "sub/cfg.json" in str(e.value) and f"delete memory://{base}/sft/{v}" in str(e.value)
    assert not (cache / "sft" / v).exists()  # a bad download is not cached

    with pytest.raises(UserError, match=f"sft@nope .*{v}"):
        A.load(mem_root, "sft", "nope")


def test_memory_partial_upload_is_incomplete_and_replaced(mem_root):
    fs, base = fsspec.core.url_to_fs(mem_root)
    fs.pipe_file(f"{base}/sft/v1/stale.bin", b"crashed upload, no manifest")
    assert not A.exists(mem_root, "sft", "v1") and A.list_versions(mem_root, "sft") == []
    make(mem_root, "sft", {"w": b"good"}, version="v1")
    assert A.exists(mem_root, "sft", "v1")
    assert not fs.exists(f"{base}/sft/v1/stale.bin")
    A.load(mem_root, "sft", "v1")
    A.remove(mem_root, "sft", "v1")
    assert not A.exists(mem_root, "sft", "v1") and not fs.exists(f"{base}/sft/v1")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_accept_publishes_the_same_files_under_the_new_version(where, root, mem_root):
    store = str(root) if where == "local" else mem_root
    v1 = make(store, "sft", {"w.bin": b"weights", "sub/c.json": b"{}"}, config={"lr": 1})
    up = make(store, "data", {"rows": b"1"}, config={"n": 2})
    uri = A.accept(store, "sft", v1, "v2", updates={"config": {"lr": 1, "comment": "x"},
                                                     "inputs": {"dataset": {"name": "data", "version": up}}},
                   reasons=["config: comment"])
    assert uri == A.artifact_uri(store, "sft", "v2")
    m = A.read_manifest(store, "sft", "v2")
    assert m["version"] == "v2" and m["config"] == {"lr": 1, "comment": "x"} and m["files"] == A.read_manifest(
        store, "sft", v1)["files"]
    assert m["accepted"]["from"] == v1 and m["accepted"]["reasons"] == ["config: comment"]
    assert [e["name"] for e in m["upstream"]] == ["data"]  # recomputed from the new inputs
    got = snapshot(A.load(store, "sft", "v2"))
    assert got == {"w.bin": b"weights", "sub/c.json": b"{}", "manifest.json": got["manifest.json"]}
    assert A.latest(store, "sft") == "v2" and A.damage(store, "sft", "v2", rehash=True) == []
    with pytest.raises(UserError, match="already in the store"):
        A.accept(store, "sft", v1, "v2", updates={}, reasons=[])
    with pytest.raises(ValueError, match="metrics"):
        A.accept(store, "sft", v1, "v3", updates={"metrics": {}}, reasons=[])


def test_clean_staging_of_a_remote_root_takes_the_cache_staging_of_that_version_only(mem_root, cache):
    crashed = A.staging_dir(mem_root, "sft", "v1")
    other = A.staging_dir(mem_root, "sft", "v11")
    assert crashed.parent == cache / "sft"
    make(mem_root, "sft", {"w": b"ok"}, version="v2")
    A.load(mem_root, "sft", "v2")
    assert A.clean_staging(mem_root, "sft", "v1") == [str(crashed)]
    assert not crashed.exists() and other.exists() and (cache / "sft" / "v2").exists()
