"""`r1flow`: run the recipe, rerun one stage, inspect status and artifacts, print the report.

    r1flow run [overrides...]                 the whole recipe (make pipeline ARGS="recipe=r1_zero size=smoke")
    r1flow stage NAME [--force] [overrides]   one stage from the latest complete versions of its inputs
    r1flow status [overrides]                 each stage: version and done / damaged / missing / stale (and why)
    r1flow accept NAME... [overrides]         keep the latest artifact of NAME as its new version after a change
                                              that does not alter results (recorded in the manifest)
    r1flow artifacts ls [NAME] | show NAME[@VERSION] | lineage NAME[@VERSION]
    r1flow artifacts verify [NAME[@VERSION]]  re-hash files against their manifests; exit 1 naming damaged files
    r1flow artifacts rm NAME@VERSION          remove one version (what was made from it stays, and is named)
    r1flow report [NAME[@VERSION]]            the evaluation table and where the plots are
    r1flow config [overrides]                 the composed config
    r1flow serve [overrides]                  a Prefect deployment to start runs from the UI (needs `make ui`)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_API = "http://127.0.0.1:4200/api"


def _prefect_env() -> None:
    """Project-local Prefect state; report to a running `make ui` server, else Prefect's own temporary one."""
    os.environ.setdefault("PREFECT_HOME", str(PROJECT_ROOT / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "PREFECT_API_URL" not in os.environ:
        try:
            with urllib.request.urlopen(DEFAULT_API + "/health", timeout=0.5):
                os.environ["PREFECT_API_URL"] = DEFAULT_API
        except OSError:
            pass


def _parse(argv):
    parser = argparse.ArgumentParser(prog="r1flow", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "status", "config", "serve"):
        p = sub.add_parser(name)
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. recipe=r1_zero size=smoke")
    p = sub.add_parser("stage")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="rerun even if its version exists")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("accept")
    p.add_argument("names", nargs="+", help="stages whose latest artifact stands for their planned version")
    p = sub.add_parser("artifacts")
    p.add_argument("action", choices=["ls", "show", "lineage", "verify", "rm"])
    p.add_argument("ref", nargs="?", help="NAME or NAME@VERSION")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("report")
    p.add_argument("ref", nargs="?", default="report", help="a report or evaluation artifact (NAME[@VERSION])")
    p.add_argument("overrides", nargs="*")
    # Overrides may come before or after flags (`stage NAME --force size=smoke`): argparse stops a positional list at
    # the first flag, so the rest arrive as unknown arguments; anything there that is not key=value is an error.
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command == "accept":  # names and overrides share the positional list
        args.overrides = [a for a in args.names if "=" in a]
        args.names = [a for a in args.names if "=" not in a]
        if not args.names:
            parser.error("accept: name at least one stage")
    if rest:
        args.overrides = list(getattr(args, "overrides", [])) + rest
    # An optional positional ref followed by overrides: `r1flow report artifacts_root=X` has no ref.
    if getattr(args, "ref", None) and "=" in args.ref:
        args.overrides.insert(0, args.ref)
        args.ref = "report" if args.command == "report" else None
    return args


def cmd_status(overrides) -> int:
    from pipeline.plan import artifacts_root, compose_config, plan, stage_status

    cfg = compose_config(overrides)
    root = artifacts_root(cfg)
    print(f"recipe {cfg.recipe.name}  artifacts {root}")
    for stage in plan(cfg):
        state, details = stage_status(root, stage)
        print(f"  {stage.name:<24} {stage.version}  {state}" + (f"  ({'; '.join(details)})" if details else ""))
    return 0


def cmd_accept(names, overrides) -> int:
    """Each named stage (in recipe order): its latest artifact becomes its planned version, files shared."""
    from pipeline import artifacts
    from pipeline.plan import artifacts_root, compose_config, plan, stale_reasons
    from stages.shared.errors import UserError

    cfg = compose_config(overrides)
    root = artifacts_root(cfg)
    stages = plan(cfg)
    unknown = set(names) - {s.name for s in stages}
    if unknown:
        raise UserError(f"accept: no stage {', '.join(sorted(unknown))} in recipe '{cfg.recipe.name}' "
                        f"(its stages: {', '.join(s.name for s in stages)})")
    for stage in (s for s in stages if s.name in names):
        if artifacts.exists(root, stage.name, stage.version):
            print(f"{stage.name}@{stage.version} is done already")
            continue
        latest = artifacts.latest(root, stage.name)
        if latest is None:
            raise UserError(f"accept: {stage.name} has no artifact in {root} to keep; run it: `r1flow stage "
                            f"{stage.name}`")
        for role, version in stage.input_versions.items():
            if not artifacts.exists(root, stage.inputs[role], version):
                raise UserError(f"accept: {stage.name}'s input '{role}' would be {stage.inputs[role]}@{version}, "
                                f"which is not in the store: run or accept {stage.inputs[role]} first "
                                f"(`r1flow accept {stage.inputs[role]} {stage.name}`)")
        reasons = stale_reasons(stage, artifacts.read_manifest(root, stage.name, latest))
        updates = {"config": stage.config, "fingerprints": stage.fingerprints, "code": stage.code,
                   "inputs": {role: {"name": stage.inputs[role], "version": v}
                              for role, v in stage.input_versions.items()}}
        with artifacts.lease(root, stage.name, stage.version, log=print):
            uri = artifacts.accept(root, stage.name, latest, stage.version, updates=updates, reasons=reasons)
        print(f"accepted {stage.name}@{latest} as {stage.name}@{stage.version} ({'; '.join(reasons)}): {uri}")
    return 0


def _resolve(root: str, ref: str) -> tuple[str, str]:
    """NAME@VERSION, or NAME for its latest complete version."""
    from pipeline import artifacts
    from stages.shared.errors import UserError

    name, version = artifacts.parse_ref(ref)
    version = version or artifacts.latest(root, name)
    if version is None:
        raise UserError(f"no complete '{name}' artifact in {root}: run `make pipeline` (or `r1flow stage {name}`) "
                        f"first, or pass artifacts_root=... if your run used another store")
    return name, version


def cmd_artifacts(action, ref, overrides) -> int:
    from pipeline import artifacts
    from pipeline.plan import artifacts_root, compose_config

    root = artifacts_root(compose_config(overrides))
    if action == "ls":
        listing = artifacts.list_artifacts(root)
        for name, manifests in sorted(listing.items()):
            if ref and name != ref:
                continue
            for m in manifests:
                inputs = ", ".join(f"{i['name']}@{i['version']}" for i in m["inputs"].values()) or "-"
                print(f"{name:<24} {m['version']}  {m['kind']:<10} {m.get('ended_at', '')[:19]}  inputs: {inputs}")
        return 0
    if action == "verify":
        return cmd_verify(root, ref)
    if action == "rm":
        return cmd_rm(root, ref)
    if not ref:
        raise SystemExit(f"usage: r1flow artifacts {action} NAME[@VERSION]")
    name, version = _resolve(root, ref)
    if action == "show":
        print(json.dumps(artifacts.read_manifest(root, name, version), indent=2))
    else:
        print(artifacts.format_lineage(artifacts.lineage(root, name, version)))
    return 0


def cmd_rm(root: str, ref: str | None) -> int:
    """Remove one artifact version to free its space. The version must be named: a bare NAME would take whatever is
    latest. Artifacts made from it stay and are still reused (their versions come from the config, not the store);
    their lineage shows it as MISSING. A later `r1flow run` of the same recipe computes it again, as it does every
    missing stage."""
    from pipeline import artifacts
    from stages.shared.errors import UserError

    if not ref or "@" not in ref:
        raise UserError(f"artifacts rm needs NAME@VERSION, got {ref!r}: `r1flow artifacts ls` lists the versions")
    name, version = artifacts.parse_ref(ref)
    manifest = artifacts.read_manifest(root, name, version)  # UserError naming the store if it is not there
    size = sum(int(f["size"]) for f in manifest["files"])
    made_from_it = artifacts.dependents(root, name, version)
    # the lease a run computing name@version holds: a `stage --force` of it does not write while its files go
    with artifacts.lease(root, name, version):
        artifacts.remove(root, name, version)
    freed = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"
    print(f"removed {name}@{version} ({freed}) from {root}")
    if made_from_it:
        print(f"made from it and kept: {', '.join(made_from_it)} (their lineage shows {name}@{version} as MISSING)")
    return 0


def cmd_verify(root: str, ref: str | None) -> int:
    """Re-hash every file of NAME@VERSION, of every version of NAME, or of every artifact; 1 if any is damaged."""
    from pipeline import artifacts

    if ref and "@" in ref:
        targets = [artifacts.parse_ref(ref)]
        artifacts.read_manifest(root, *targets[0])  # a UserError listing the versions there are
    else:
        listing = artifacts.list_artifacts(root)
        if ref and ref not in listing:
            _resolve(root, ref)  # a UserError that says how to make one
        targets = [(name, m["version"]) for name, ms in listing.items() if ref in (None, name) for m in ms]
    damaged = 0
    for name, version in targets:
        problems = artifacts.damage(root, name, version, rehash=True)
        if problems:
            damaged += 1
            print(f"DAMAGED {name}@{version} ({artifacts.artifact_uri(root, name, version)}): " + "; ".join(problems))
        else:
            print(f"ok      {name}@{version}")
    print(f"{len(targets)} artifact(s) verified, {damaged} damaged" + (
        ": delete each damaged one's directory and rerun its stage (`r1flow stage NAME --force`)" if damaged else ""))
    return 1 if damaged else 0


def _preflight(overrides, only) -> None:
    """Config, stage names, pins, inputs and a writable store are checked before Prefect starts (seconds, not
    a flow run that fails)."""
    from pipeline import artifacts
    from pipeline.plan import artifacts_root, compose_config, plan

    cfg = compose_config(overrides)
    plan(cfg, latest_inputs_for=only)
    artifacts.check_writable(artifacts_root(cfg))


def _mark_crashed_runs() -> None:
    """Runs of this project whose process died show as Crashed from the next command on (pipeline/crashed.py)."""
    from pipeline import crashed

    try:
        for run_id in crashed.mark_crashed_runs():
            print(f"r1flow: flow run {run_id} had died without reporting; marked Crashed in Prefect", file=sys.stderr)
    except Exception as e:  # Prefect unreachable: the command itself does not need it
        print(f"r1flow: could not mark dead runs as Crashed in Prefect ({e!r})", file=sys.stderr)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    _prefect_env()
    from stages.shared.errors import UserError

    _mark_crashed_runs()

    try:
        if args.command == "config":
            from omegaconf import OmegaConf

            from pipeline.plan import compose_config

            print(OmegaConf.to_yaml(compose_config(args.overrides)))
            return 0
        if args.command == "status":
            return cmd_status(args.overrides)
        if args.command == "accept":
            return cmd_accept(args.names, args.overrides)
        if args.command == "artifacts":
            return cmd_artifacts(args.action, args.ref, args.overrides)
        if args.command == "report":
            from pipeline.show import print_report
            from pipeline.plan import artifacts_root, compose_config
            from pipeline import artifacts

            root = artifacts_root(compose_config(args.overrides))
            name, version = _resolve(root, args.ref)
            return print_report(artifacts.load(root, name, version))
        only = args.name if args.command == "stage" else None
        _preflight(args.overrides, only)
        from pipeline.flow import r1flow_pipeline, serve

        if args.command == "serve":
            if "PREFECT_API_URL" not in os.environ:
                raise UserError(f"no Prefect server at {DEFAULT_API}: start one with `make ui`, then `make serve`")
            serve(args.overrides)
            return 0
        rows = r1flow_pipeline(overrides=args.overrides, only=only, force=getattr(args, "force", False))
        print("\n".join(f"{r['stage']:<24} {r['version']}  {r['state']:<6} {r['seconds']:>7.1f} s" for r in rows))
        return 0
    except UserError as e:
        print(f"r1flow: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
