"""From a composed config to the list of stages to run, each with the version it will produce.

A version is a pure function of everything that changes what a stage computes: its resolved config (with the
precision keys of `hardware`, without the rest), the content of the local files and directories that config names,
the source of its module and of every project module that imports transitively, and the versions of its inputs. The
whole recipe's versions are known before anything runs: a stage whose version is already in the store is done, and a
change anywhere reruns exactly the stages downstream of it. Each part is recorded in the manifest, so `status` can say
which one changed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import artifacts
from stages.shared import schema
from stages.shared.data import sha256_file
from stages.shared.errors import UserError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
# How a stage computes (device, launcher, processes, threads, dataloader workers, kernels) is not what it computes:
# `hardware` stays out of the version, so moving a run between machines reuses its artifacts -- except the keys that
# set the precision of the numbers, which do change them.
PRECISION_KEYS = ("bf16", "weights_dtype", "master_weights")
HASH_CACHE = ".hash-cache.json"  # under the work root: {path: [size, mtime_ns, sha256]}


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    kind: str
    config: dict                       # the stage's resolved config node
    inputs: dict[str, str]             # role -> producing stage name
    input_versions: dict[str, str]     # role -> version
    version: str
    fingerprints: dict[str, str] = field(default_factory=dict)  # local file or dir -> sha256 (part of the version)
    code: dict[str, str] = field(default_factory=dict)          # project source file -> sha256 (part of the version)
    pinned: bool = False               # version given by recipe.pins, not computed


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Hydra composition of conf/ with command-line style overrides; config errors become UserErrors."""
    schema.register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"config error: {e}\n(see `r1flow config --help` and the groups under conf/)") from e
    return cfg


def artifacts_root(cfg: DictConfig) -> str:
    return _project_path(cfg.artifacts_root)


def work_root(cfg: DictConfig) -> str:
    return _project_path(cfg.work_root)


def _project_path(value: str) -> str:
    """Relative local paths are relative to the project root; URLs (s3://, memory://, file://) pass through."""
    if "://" in value or Path(value).is_absolute():
        return value
    return str(PROJECT_ROOT / value)


def stage_config(cfg: DictConfig, name: str, spec: DictConfig) -> dict:
    """The stage's config node, with the recipe entry's `overrides` (e.g. eval_base evaluates with the template the
    base model was pre-trained on) merged on top."""
    key = spec.get("config") or name
    node = OmegaConf.select(cfg, key)
    if not isinstance(node, DictConfig):
        raise UserError(f"recipe '{cfg.recipe.name}': stage '{name}' reads config key '{key}', which does not exist; "
                        f"add conf/{key.split('.')[0]}/default.yaml or fix recipe.stages.{name}.config")
    overrides = spec.get("overrides")
    if overrides:
        unknown = set(overrides) - set(node)
        if unknown:
            raise UserError(f"recipe.stages.{name}.overrides sets {sorted(unknown)}, which '{key}' does not have "
                            f"(its keys: {', '.join(node)})")
        node = OmegaConf.merge(node, overrides)
    return OmegaConf.to_container(node, resolve=True)


# ---------------------------------------------------------------------------------------------------------------------
# Content hashes: local files and directories the config names, the code a stage runs


def load_hash_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_hash_cache(path: Path, cache: dict) -> None:
    """Atomic replace; two processes planning at once lose at most each other's new entries (hashed again later)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, sort_keys=True))
    os.replace(tmp, path)


def cached_sha256(path: Path, cache: dict) -> str:
    """sha256 of a file, read again only when its size or mtime changed since it was last hashed."""
    st = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    if st.st_size > 100 << 20:
        log.info("hashing %s (%.1f GB) for the version; cached in %s afterwards", path, st.st_size / 1e9, HASH_CACHE)
    digest = sha256_file(path)
    cache[key] = [st.st_size, st.st_mtime_ns, digest]
    return digest


def dir_sha256(path: Path, cache: dict) -> str:
    """One hash over every file under a directory (relative path and content), e.g. a local model.source."""
    entries = sorted((p.relative_to(path).as_posix(), cached_sha256(p, cache)) for p in path.rglob("*") if p.is_file())
    return sha256_text(json.dumps(entries))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_fingerprints(config: dict, cache: dict) -> dict[str, str]:
    """sha256 of every existing project file or directory the config names (a data file, a local model.source), so
    regenerated data or a changed local model gives new versions."""
    found = {}

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and "/" in value and "://" not in value and len(value) < 512:
            path = Path(value) if Path(value).is_absolute() else PROJECT_ROOT / value
            if path.is_file():
                found[value] = cached_sha256(path, cache)
            elif path.is_dir():
                found[value] = dir_sha256(path, cache)

    walk(config)
    return dict(sorted(found.items()))


def stage_module_name(module: str) -> str:
    """A recipe's `module` names a file in stages/; a dotted path (tests) is taken as given."""
    return module if "." in module else f"stages.{module}"


def module_file(name: str, root: Path) -> Path | None:
    """The source file of a dotted module name under root, or None (a library, or a name that is not a module)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_names(source: str, name: str, is_package: bool) -> set[str]:
    """Dotted names a module imports anywhere in it (function-level imports too), relative imports resolved; for
    `from a import b` both `a` and `a.b` (b may be a submodule)."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def code_files(module: str, root: Path, parsed: dict | None = None) -> dict[str, str]:
    """{path relative to root: sha256} of a stage module's source and of every project module it imports,
    transitively, found statically (ast): a stage that imports stages/shared/rewards/accuracy.py depends on it. The
    packages on the way count too (`__init__.py` runs on import). `parsed` ({module name: (path, sha256, imports)})
    lets the stages of one plan share the parsing of the modules they have in common."""
    parsed = {} if parsed is None else parsed
    files, seen, todo = {}, set(), [stage_module_name(module)]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            name = ".".join(parts[:i])
            if name in seen:
                continue
            seen.add(name)
            if name not in parsed:
                path = module_file(name, root)
                if path is None:
                    parsed[name] = None
                    continue
                source = path.read_text()
                parsed[name] = (path.relative_to(root).as_posix(), sha256_text(source),
                                imported_names(source, name, path.name == "__init__.py"))
            if parsed[name] is None:
                continue
            rel, digest, imports = parsed[name]
            files[rel] = digest
            todo.extend(imports)
    return dict(sorted(files.items()))


def versioned_view(config: dict) -> dict:
    """The config as it enters the version: `hardware` reduced to its precision keys."""
    out = {k: v for k, v in config.items() if k != "hardware"}
    if isinstance(config.get("hardware"), dict):
        out["hardware"] = {k: config["hardware"][k] for k in PRECISION_KEYS if k in config["hardware"]}
    return out


def plan(cfg: DictConfig, *, latest_inputs_for: str | None = None) -> list[Stage]:
    """The recipe's stages in order with their versions.

    `latest_inputs_for=NAME` plans stage NAME from the latest complete versions of its inputs in the store (what
    `r1flow stage NAME` reruns from) instead of the versions the current config would give them.
    """
    stages_cfg = cfg.recipe.stages
    pins = cfg.recipe.get("pins") or {}
    if latest_inputs_for is not None and latest_inputs_for not in stages_cfg:
        raise UserError(f"unknown stage '{latest_inputs_for}' in recipe '{cfg.recipe.name}'; "
                        f"its stages are: {', '.join(stages_cfg)}")
    for pinned_name in pins:
        if pinned_name not in stages_cfg:
            raise UserError(f"recipe.pins names '{pinned_name}', which is not a stage of recipe '{cfg.recipe.name}' "
                            f"({', '.join(stages_cfg)})")
    root = artifacts_root(cfg)
    cache_path = Path(work_root(cfg)) / HASH_CACHE
    cache = load_hash_cache(cache_path)
    cached_before = dict(cache)
    code_by_module: dict[str, dict[str, str]] = {}
    parsed_modules: dict = {}
    planned: dict[str, Stage] = {}
    for name, spec in stages_cfg.items():
        inputs = dict(spec.get("inputs") or {})
        for role, producer in inputs.items():
            if producer not in planned:
                raise UserError(f"recipe '{cfg.recipe.name}': stage '{name}' takes input '{role}' from '{producer}', "
                                f"which is not an earlier stage of the recipe")
        config = stage_config(cfg, name, spec)
        if name in pins:
            planned[name] = Stage(name, spec.module, spec.kind, config, inputs, {}, str(pins[name]), pinned=True)
            continue
        if name == latest_inputs_for:
            input_versions = {}
            for role, producer in inputs.items():
                version = artifacts.latest(root, producer)
                if version is None:
                    raise UserError(f"stage '{name}' needs input '{role}' from stage '{producer}', which has no "
                                    f"complete artifact under {root}; run `r1flow run` (or `r1flow stage {producer}`)")
                input_versions[role] = version
        else:
            input_versions = {role: planned[producer].version for role, producer in inputs.items()}
        fingerprints = file_fingerprints(config, cache)
        if spec.module not in code_by_module:
            code_by_module[spec.module] = code_files(spec.module, PROJECT_ROOT, parsed_modules)
        code = code_by_module[spec.module]
        version = artifacts.compute_version(spec.module, versioned_view(config), input_versions, fingerprints, code)
        planned[name] = Stage(name, spec.module, spec.kind, config, inputs, input_versions, version, fingerprints,
                              code)
    if cache != cached_before:
        try:
            save_hash_cache(cache_path, cache)
        except OSError as e:  # a read-only work root (status from another user's checkout): hash again next time
            log.warning("could not save the hash cache %s (%s)", cache_path, e)
    return list(planned.values())


def stage_status(root: str, stage: Stage) -> tuple[str, list[str]]:
    """(state, details). done: the planned version is in the store, its files of the recorded sizes; damaged: it is,
    but files are missing or truncated (details name them; `r1flow artifacts verify` re-hashes); stale: only other
    versions exist, and details say what changed since the latest (config, code, input, data); missing: nothing yet."""
    if artifacts.exists(root, stage.name, stage.version):
        problems = artifacts.damage(root, stage.name, stage.version, rehash=False)
        return ("damaged", problems) if problems else ("done", [])
    latest = artifacts.latest(root, stage.name)
    if latest is None:
        return "missing", []
    return "stale", stale_reasons(stage, artifacts.read_manifest(root, stage.name, latest))


def stale_reasons(stage: Stage, manifest: dict) -> list[str]:
    """What differs between the version a manifest records and the planned one, part by part:
    'config: lr, hardware.bf16', 'code: stages/shared/rewards/accuracy.py', 'input: model', 'data: data/x.jsonl'."""
    reasons = []
    old, new = _flat(versioned_view(manifest["config"])), _flat(versioned_view(stage.config))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    if changed:
        reasons.append("config: " + _some(changed))
    if manifest["stage"] != stage.module:
        reasons.append(f"code: module {manifest['stage']} -> {stage.module}")
    elif "code" not in manifest:
        reasons.append("code: not recorded (made before versions covered code)")
    else:
        changed = _changed_keys(manifest["code"], stage.code)
        if changed:
            reasons.append("code: " + _some(changed))
    old_inputs = {role: ref["version"] for role, ref in manifest["inputs"].items()}
    changed = _changed_keys(old_inputs, stage.input_versions)
    if changed:
        reasons.append("input: " + _some(changed))
    changed = _changed_keys(manifest.get("fingerprints") or {}, stage.fingerprints)
    if changed:
        reasons.append("data: " + _some(changed))
    return reasons or ["the version formula changed (no recorded part differs)"]


_ABSENT = object()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _some(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
