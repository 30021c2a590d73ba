"""From a composed config to the list of stages to run, each with the version it will produce.

A version is a pure function of the stage's resolved config, the content of the local files that config names, and
the versions of its inputs, so the whole recipe's versions are known before anything runs: a stage whose version is
already in the store is done, and a change anywhere reruns exactly the stages downstream of it.
"""

from __future__ import annotations

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

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
# How a stage computes (threads, device, launcher) is not what it computes: hardware stays out of the version, so
# moving a run from one machine to another reuses its artifacts.
NOT_VERSIONED = ("hardware",)


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    kind: str
    config: dict                       # the stage's resolved config node
    inputs: dict[str, str]             # role -> producing stage name
    input_versions: dict[str, str]     # role -> version
    version: str
    fingerprints: dict[str, str] = field(default_factory=dict)  # local file -> sha256 (part of the version)
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


def file_fingerprints(config: dict) -> dict[str, str]:
    """sha256 of every existing project file the config names, so regenerated data gives new versions."""
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
                found[value] = sha256_file(path)

    walk(config)
    return dict(sorted(found.items()))


def versioned_view(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_VERSIONED}


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
        fingerprints = file_fingerprints(config)
        version = artifacts.compute_version(spec.module, versioned_view(config), input_versions, fingerprints)
        planned[name] = Stage(name, spec.module, spec.kind, config, inputs, input_versions, version, fingerprints)
    return list(planned.values())


def stage_status(root: str, stage: Stage) -> str:
    """done: the planned version exists; stale: only other versions exist (an input or the config changed);
    missing: nothing yet."""
    if artifacts.exists(root, stage.name, stage.version):
        return "done"
    return "stale" if artifacts.latest(root, stage.name) else "missing"
