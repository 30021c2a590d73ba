"""Loading and validating data files for every stage.

A file entry (`data.files.<name>` in conf/data/*.yaml) is one of
    "path/to/file.jsonl" | "path/to/file.parquet"            relative paths resolve against the project root
    {path: local file, columns: {ours: theirs}}               a local file whose columns have other names
    {hub: id, split: train, subset: null, data_dir: null, columns: {...}}
                                                              a `datasets.load_dataset` hub dataset (`hub` may be a
                                                              local copy of the repository; `split` takes slices:
                                                              train[:-500]; `data_dir`: a folder of the repository)
    {mix: [entry, entry, ...], shares: [null, 0.3, ...]}      rows of several entries in the given shares (null:
                                                              what the others leave), evenly interleaved
`load_rows` returns plain dicts with our column names, or raises `UserError` naming the file, line, field or key.
"""
from __future__ import annotations

import functools
import logging
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable, Iterable

from stages.shared.errors import UserError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "`python data/arith/prepare.py` regenerates the embedded task world"


def resolve_path(p: str | os.PathLike) -> Path:
    """`p` as an absolute path; relative paths are taken from the project root (the directory of pyproject.toml)."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all (one TCP connect, remembered per process).

    Without it an unreachable hub costs ~50 s of library retries before the error. HF_HUB_OFFLINE=1 means no; with a
    proxy configured the direct probe says nothing, so the libraries decide.
    """
    return not hub_offline() and _probe_hub(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.lru_cache(maxsize=4)
def _probe_hub(endpoint: str, timeout: float = 3.0) -> bool:
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    from urllib.parse import urlparse
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout):
            return True
    except OSError:
        return False


def plain(node: Any) -> Any:
    """A Hydra/OmegaConf node as plain Python containers (resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return node


def sha256_file(path: str | os.PathLike) -> str:
    """Streamed in 1 MiB chunks: checkpoints are many GB, never read a file whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_rows(spec: Any, required: Iterable[str] = (), name: str = "file",
              check_row: Callable[[dict, str], None] | None = None) -> list[dict]:
    """All rows of the file entry `spec` (see module doc) with `required` fields present and non-null.

    `name` names the setting in error messages: a `data.files` entry (`rl_train` -> `data.files.rl_train`) or a
    full config key with a dot (`reasoning_grpo.train_file`). `check_row(row, where)` may raise a UserError about a
    row; `where` names its file and line (or hub dataset and row).
    """
    spec = plain(spec)
    required = list(required)
    key = name if "." in name else f"data.files.{name}"
    if spec is None or spec == "":
        raise UserError(f"{key} is not set: give a JSONL/Parquet path or {{hub: id, split: ...}}")
    if isinstance(spec, dict) and "mix" in spec:
        return _load_mix(spec, required, name, key, check_row)
    columns: dict = {}
    if isinstance(spec, (str, os.PathLike)):
        rows, where = _read_file(spec, key)
    elif isinstance(spec, dict):
        columns = spec.get("columns") or {}
        if not isinstance(columns, dict):
            raise UserError(f"{key}.columns must map our column name to the file's, e.g. {{prompt: problem}}")
        unknown = sorted(set(spec) - {"path", "hub", "split", "subset", "data_dir", "columns"})
        if unknown:
            raise UserError(f"{key}: unknown keys {unknown}; allowed: path, hub, split, subset, data_dir, columns")
        if ("path" in spec) == ("hub" in spec):
            raise UserError(f"{key} needs exactly one of `path` (a local file) or `hub` (a dataset id)")
        if "path" in spec:
            rows, where = _read_file(spec["path"], key)
        else:
            rows, where = _read_hub(spec, key)
    else:
        raise UserError(f"{key} must be a path or a mapping, not {type(spec).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{where(i)}: expected a JSON object, got {type(row).__name__}")
        row = _rename(row, columns, where(i), key)
        missing = [f for f in required if row.get(f) is None]
        if missing:
            raise UserError(f"{where(i)}: missing required field {missing[0]!r} (required: {required}); columns "
                            f"present: {sorted(row)}. Map other column names with {key}.columns: "
                            f"{{{missing[0]}: <their column>}}")
        if check_row is not None:
            check_row(row, where(i))
        out.append(row)
    if not out:
        raise UserError(f"{where(None)} has no rows ({key})")
    return out


def _load_mix(spec: dict, required: list, name: str, key: str, check_row) -> list[dict]:
    """The rows of `spec["mix"]`'s entries in `spec["shares"]` (one null share takes what the others leave): as many
    rows as the parts hold without repeating any, the first rows of each part, evenly interleaved (deterministic)."""
    parts, shares = spec.get("mix"), spec.get("shares")
    if set(spec) != {"mix", "shares"} or not isinstance(parts, list) or not isinstance(shares, list) \
            or len(parts) != len(shares) or not parts:
        raise UserError(f"{key}: a mix is {{mix: [entry, ...], shares: [share, ...]}} with one share per entry")
    if sum(s is None for s in shares) > 1 or any(s is not None and not (isinstance(s, (int, float)) and 0 <= s <= 1)
                                                for s in shares):
        raise UserError(f"{key}.shares must be numbers in [0, 1], at most one null (the rest), got {shares}")
    given = sum(s for s in shares if s is not None)
    shares = [max(0.0, 1.0 - given) if s is None else float(s) for s in shares]
    if abs(sum(shares) - 1.0) > 1e-6:
        raise UserError(f"{key}.shares must add up to 1, got {shares}")
    loaded = [load_rows(part, required, f"{name}.mix[{i}]" if "." in name else f"{key}.mix[{i}]", check_row)
              if share > 0 else [] for i, (part, share) in enumerate(zip(parts, shares))]
    total = min(len(rows) / share for rows, share in zip(loaded, shares) if share > 0)
    keyed = []
    for i, (rows, share) in enumerate(zip(loaded, shares)):
        n = int(share * total + 1e-9)
        keyed += [((j + 0.5) / n, i, row) for j, row in enumerate(rows[:n])]
    return [row for *_, row in sorted(keyed, key=lambda t: (t[0], t[1]))]


def load_task_rows(spec: Any, name: str, required: Iterable[str] = ("prompt",)) -> list[dict]:
    """Rows of a prompt file (RL prompts, a held-out split, a benchmark), each either math (a gold `answer`) or code
    (`tests`, see stages/shared/sandbox.py). Test cases are parsed here, so that a malformed one stops the run with
    an error naming the file, the row and the case, before any training."""
    from stages.shared.sandbox import parse_tests

    def check(row: dict, where: str) -> None:
        if row.get("tests") is not None:
            parse_tests(row["tests"], where if row.get("id") is None else f"{where} (id {row['id']})")
        elif row.get("answer") is None:
            raise UserError(f"{where}: a prompt row needs a gold `answer` (math) or `tests` (code); columns present: "
                            f"{sorted(row)}")

    return load_rows(spec, required, name, check_row=check)


def _rename(row: dict, columns: dict, where: str, key: str) -> dict:
    if not columns:
        return row
    absent = [theirs for theirs in columns.values() if theirs not in row]
    if absent:
        raise UserError(f"{where}: column {absent[0]!r} named in {key}.columns is not there; columns present: "
                        f"{sorted(row)}")
    out = {k: v for k, v in row.items() if k not in columns.values() or k in columns}
    for ours, theirs in columns.items():
        out[ours] = row[theirs]
    return out


def _read_file(p: Any, key: str):
    path = resolve_path(p)
    if not path.is_file():
        hint = REGENERATE if "data/arith" in path.as_posix() else f"set {key} to an existing file"
        raise UserError(f"{key}: file {path} not found; {hint} (or point {key} at another JSONL/Parquet file)")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 -- any reader failure is a bad input file
            raise UserError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
        return rows, lambda i: f"{path}" if i is None else f"{path}: row {i}"
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e}); every line of a JSONL file must be one "
                                f"JSON object") from None
    linenos = [n for n, _ in rows]
    return [r for _, r in rows], lambda i: f"{path}" if i is None else f"{path}:{linenos[i]}"


def _read_hub(spec: dict, key: str):
    hub = str(spec["hub"])
    hint = (f"Set {key} to a local JSONL/Parquet file with the same columns (e.g. {{path: my.jsonl, columns: ...}}), "
            f"or allow network access (unset HF_HUB_OFFLINE)")
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise UserError(f"{key}: hub dataset {hub!r} needs the `datasets` package. {hint}") from None
    split = spec.get("split") or "train"
    local = resolve_path(hub)  # a local copy of the dataset repository (same layout) loads like the hub id
    if local.is_dir():
        hub = str(local)
    elif not hub_offline() and not hub_reachable():
        raise UserError(f"{key}: cannot load hub dataset {hub!r}: the hub is unreachable from this machine (if the "
                        f"dataset is in the local cache, HF_HUB_OFFLINE=1 uses it). {hint}")
    try:
        # subset: a config of the dataset (`name`); data_dir: a folder of its repository (hh-rlhf's helpful-base has
        # no config of its own)
        ds = datasets.load_dataset(hub, spec.get("subset"), split=split, data_dir=spec.get("data_dir"))
    except Exception as e:  # noqa: BLE001 -- offline, unreachable, unknown id, bad split: all need the same fix
        why = "HF_HUB_OFFLINE=1 is set and it is not cached" if hub_offline() and not local.is_dir() else \
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise UserError(f"{key}: cannot load hub dataset {hub!r} (split {split!r}): {why}. {hint}") from None
    label = f"{hub} [{split}]"
    return ds.to_list(), lambda i: label if i is None else f"{label} row {i}"


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """The one atomic writer: a temporary file beside `path`, flushed to disk, then renamed over it, so a reader (or a
    rerun after a crash) sees the old file or the whole new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Rows as JSON lines, atomically."""
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """One JSON document, atomically."""
    return write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


SFT_DATASET_FILE = "train.jsonl"  # what rejection_sampling writes and the SFT stages read


def sft_dataset(dataset_dir: str | Path, max_samples: int | None = None):
    """The stage-3 conversations of a dataset artifact as a TRL conversational dataset ({messages}); also returns
    the count per kind."""
    from datasets import Dataset

    path = Path(dataset_dir) / SFT_DATASET_FILE
    if not path.is_file():
        raise UserError(f"{dataset_dir} is not a stage-3 dataset artifact ({SFT_DATASET_FILE} missing); give the "
                        f"rejection_sampling stage's output")
    rows = load_rows(str(path), ["messages"], "rejection_sampling.train")
    if max_samples:
        rows = rows[: int(max_samples)]
    out, kinds = [], {}
    for i, r in enumerate(rows):
        messages = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        if not messages or messages[-1]["role"] != "assistant":
            raise UserError(f"{path} row {i}: `messages` must end with an assistant turn")
        out.append({"messages": messages})
        kind = str(r.get("kind") or "reasoning")
        kinds[kind] = kinds.get(kind, 0) + 1
    return Dataset.from_list(out), kinds


# ---------------------------------------------------------------------------------------------------------------------
# Decontamination

_WORD = re.compile(r"\w+")


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of lower-cased text; a text shorter than n words is one gram (the whole of it)."""
    words = _WORD.findall(str(text).lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def evaluation_sets(cfg) -> dict[str, Any]:
    """{name: file entry} of what a stage's training rows are decontaminated against: the held-out split
    (cfg.eval_file, as `heldout`) and every benchmark (cfg.benchmarks)."""
    sets = {"heldout": cfg.get("eval_file")}
    sets.update(plain(cfg.get("benchmarks")) or {})
    return {k: v for k, v in sets.items() if v is not None}


def decontaminate(rows: list[dict], against: dict[str, Any], *, ngram: int, key: str,
                  field: str = "prompt") -> tuple[list[dict], dict[str, int]]:
    """`rows` without those whose `field` shares a word `ngram`-gram with a question of any evaluation set in
    `against` ({name: file entry with a prompt column}: the held-out split and every benchmark), as open-r1
    decontaminates its training sets (8-grams). Returns (kept rows, {"decontaminated_<name>": rows dropped for it,
    "decontaminated": total}), numbers a stage puts in its manifest metrics. ngram <= 0 turns it off."""
    if ngram <= 0 or not against:
        return rows, {"decontaminated": 0}
    grams: dict[str, set] = {}
    for name, spec in against.items():
        if spec is None:
            continue
        grams[name] = set().union(*(_ngrams(r["prompt"], ngram)
                                    for r in load_rows(spec, ["prompt"], f"{key} (decontamination against {name})")))
    counts = {f"decontaminated_{name}": 0 for name in grams}
    kept = []
    for row in rows:
        hit = next((name for name, g in grams.items() if _ngrams(row.get(field) or "", ngram) & g), None)
        if hit is None:
            kept.append(row)
        else:
            counts[f"decontaminated_{hit}"] += 1
    counts["decontaminated"] = len(rows) - len(kept)
    if counts["decontaminated"]:
        log.info("%s: %d of %d rows share a %d-gram with an evaluation set and are left out (%s)", key,
                 counts["decontaminated"], len(rows), ngram,
                 ", ".join(f"{k.removeprefix('decontaminated_')} {v}" for k, v in counts.items() if k != "decontaminated"))
    return kept, counts
