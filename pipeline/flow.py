"""The Prefect flow: one task per stage of the recipe, in order, each skipped when its version is in the store.

The flow knows stage names, versions and metrics; it knows nothing about training. What a stage does lives in
`stages/`, how it is launched in `pipeline/runner.py`.
"""

from __future__ import annotations

import re
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from pipeline import artifacts, runner
from pipeline.plan import Stage, artifacts_root, compose_config, plan, work_root


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower())


def metrics_markdown(stage: Stage, result: dict) -> str:
    state = "cached" if result["cached"] else f"ran in {result['seconds']:.1f} s"
    lines = [f"### {stage.name} @ `{stage.version}` ({state})", "",
             f"inputs: {', '.join(f'{r}=`{stage.inputs[r]}@{v}`' for r, v in stage.input_versions.items()) or 'none'}",
             "", "| metric | value |", "|---|---|"]
    for key, value in sorted(result["metrics"].items()):
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)


@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage_task(stage: Stage, root: str, work: str, force: bool = False):
    logger = get_run_logger()
    result = runner.run_stage(stage, root=root, work_root=work, log=logger.info, force=force)
    create_markdown_artifact(key=artifact_key(stage.name), markdown=metrics_markdown(stage, result),
                             description=f"{stage.name} metrics and version")
    if stage.kind == "report":
        report_md = artifacts.load(root, stage.name, stage.version, verify=False) / "report.md"
        if report_md.exists():
            create_markdown_artifact(key="run-report", markdown=report_md.read_text(),
                                     description=f"r1flow report ({report_md})")
    if result["cached"]:
        logger.info(f"{stage.name}@{stage.version} is in the store: cached")
        return Completed(name="Cached", message=f"cached: {stage.name}@{stage.version}", data=result)
    logger.info(f"{stage.name}@{stage.version} done in {result['seconds']:.1f} s")
    return result


@flow(name="r1flow", log_prints=True)
def r1flow_pipeline(overrides: list[str] | None = None, only: str | None = None, force: bool = False) -> list[dict]:
    """Run the configured recipe (`overrides` are Hydra overrides); `only=NAME` reruns one stage from the latest
    complete versions of its inputs, `force` even when its version exists."""
    cfg = compose_config(overrides or [])
    stages = plan(cfg, latest_inputs_for=only)
    if only:
        stages = [s for s in stages if s.name == only]
    root, work = artifacts_root(cfg), work_root(cfg)
    rows = []
    for stage in stages:
        t0 = time.time()
        task_fn = run_stage_task.with_options(name=stage.name, task_run_name=stage.name, retries=cfg.run.retries,
                                              retry_delay_seconds=cfg.run.retry_delay_s)
        state = task_fn(stage, root, work, force=force, return_state=True)
        result = state.result()  # raises the stage's error: the flow fails with it
        rows.append({"stage": stage.name, "version": stage.version,
                     "state": "cached" if result["cached"] else "ran", "seconds": round(time.time() - t0, 1)})
    create_table_artifact(key="run-summary", table=rows, description=f"recipe {cfg.recipe.name}: what ran, what was cached")
    return rows


def serve(overrides: list[str]) -> None:
    """A deployment: start the pipeline or a single stage from the Prefect UI with parameters."""
    r1flow_pipeline.serve(name="r1flow", parameters={"overrides": overrides, "only": None, "force": False},
                          description="DeepSeek-R1 recipe; set `only` to rerun one stage, `overrides` for Hydra")
