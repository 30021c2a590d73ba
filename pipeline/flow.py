"""The Prefect flow: one task per stage of the recipe, each waiting on the tasks of its input stages (so the flow-run
graph is the recipe's DAG), each skipped when its version is in the store.

The flow knows stage names, versions and metrics; it knows nothing about training. What a stage does lives in
`stages/`, how it is launched in `pipeline/runner.py`. While a stage runs, the task follows the JSON lines the stage
process appends to its events file (runner.events_path) and turns them into a progress artifact and a metrics table;
when it ends, the stage's PNGs are embedded in its markdown artifact.
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import fsspec
from omegaconf import OmegaConf
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.context import get_run_context
from prefect.futures import wait as wait_all
from prefect.states import Completed
from prefect.utilities.annotations import quote
from tqdm.auto import tqdm

from pipeline import artifacts, crashed, runner
from pipeline.plan import Stage, artifacts_root, compose_config, plan, work_root

# Columns of the live metrics table: what R1 runs are watched by (reward, accuracy, length, KL) and the SFT loss.
SHOWN_METRIC = re.compile(r"^(loss|reward|rewards/[^/]+/mean|completions/mean_length|kl|entropy|.*accuracy.*"
                          r"|learning_rate)$")
EVENT_POLL_S = 1.0
TABLE_ROWS = 100  # the live metrics table shows the newest log steps; the artifact's log_history.jsonl has them all


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower())


# ---------------------------------------------------------------------------------------------------------------------
# Pictures: PNGs as data URIs, the only images Prefect's markdown renders (it cannot read the local disk)

def png_data_uri(data: bytes, max_width: int, max_bytes: int) -> str:
    """A PNG as a data:image/png;base64 URI, downscaled to at most `max_width` pixels wide and, halving the width
    again while needed, at most `max_bytes` bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    width = min(image.width, max_width)
    while True:
        if width < image.width:
            image = image.resize((width, max(1, round(image.height * width / image.width))), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_bytes or width <= 200:
            return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        width = image.width // 2


def stage_pngs(root: str, stage: Stage, run_cfg) -> dict[str, str]:
    """{file name in the artifact: data URI} for every PNG the stage wrote (read through fsspec: remote stores too)."""
    manifest = artifacts.read_manifest(root, stage.name, stage.version)
    uri = artifacts.artifact_uri(root, stage.name, stage.version)
    pngs = {}
    for entry in manifest["files"]:
        if entry["path"].lower().endswith(".png"):
            with fsspec.open(f"{uri}/{entry['path']}", "rb") as f:
                pngs[entry["path"]] = png_data_uri(f.read(), run_cfg["image_max_width"],
                                                   run_cfg["image_max_kib"] * 1024)
    return pngs


def inline_images(markdown: str, pngs: dict[str, str]) -> str:
    """`![alt](plot.png)` links to the artifact's files become data URIs."""
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)",
                  lambda m: f"![{m.group(1)}]({pngs[m.group(2)]})" if m.group(2) in pngs else m.group(0), markdown)


def metrics_markdown(stage: Stage, result: dict, pngs: dict[str, str]) -> str:
    state = "cached" if result["cached"] else f"ran in {result['seconds']:.1f} s"
    lines = [f"### {stage.name} @ `{stage.version}` ({state})", "",
             f"inputs: {', '.join(f'{r}=`{stage.inputs[r]}@{v}`' for r, v in stage.input_versions.items()) or 'none'}",
             "", "| metric | value |", "|---|---|"]
    for key, value in sorted(result["metrics"].items()):
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    for name, uri in sorted(pngs.items()):
        lines += ["", f"**{name}**", "", f"![{name}]({uri})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Live progress: the stage process appends JSON lines {"t", "phase", "step", "total", "metrics"?} to its events file

def read_new_events(path: Path, offset: int, since: float) -> tuple[list[dict], int]:
    """Complete lines appended after `offset`, written at or after `since` (an earlier attempt's file may still be
    there until the runner replaces it); returns (events, new offset)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) < offset:  # replaced by a new attempt's file
                offset = 0
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], 0
    complete = chunk[:chunk.rfind(b"\n") + 1]
    events = []
    for line in complete.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("t", 0) >= since:
            events.append(event)
    return events, offset + len(complete)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_description(event: dict, phase_start: tuple[float, int]) -> str:
    """`reasoning_grpo training: step 40 of 150 · 2m10s elapsed · ETA 5m58s` (rate since the phase's first event)."""
    t0, step0 = phase_start
    elapsed = event["t"] - t0
    text = f"{event['phase']}: step {event['step']} of {event['total']} · {duration(elapsed)} elapsed"
    if event["step"] > step0 and event["step"] < event["total"]:
        eta = elapsed / (event["step"] - step0) * (event["total"] - event["step"])
        text += f" · ETA {duration(eta)}"
    return text


def show_progress(stage: Stage, events: list[dict], watch: dict) -> None:
    """Create or update the stage's progress artifact with the newest event, and its metrics table with every log
    step's metrics so far. `watch` carries the artifacts' ids, phase start times and rows between calls."""
    if not events:
        return
    for event in events:
        watch["phase_start"].setdefault(event["phase"], (event["t"], event["step"]))
        shown = {k: v for k, v in (event.get("metrics") or {}).items() if SHOWN_METRIC.match(k)}
        if shown:
            watch["rows"].append({"phase": event["phase"], "step": event["step"], **shown})
    last = events[-1]
    percent = 100.0 * min(last["step"], last["total"]) / max(last["total"], 1)
    description = progress_description(last, watch["phase_start"][last["phase"]])
    if watch["artifact_id"] is None:
        watch["artifact_id"] = create_progress_artifact(percent, key=f"progress-{artifact_key(stage.name)}",
                                                        description=description)
    else:
        update_progress_artifact(watch["artifact_id"], percent, description=description)
    if any(e.get("metrics") for e in events) and watch["rows"]:
        columns = sorted({k for row in watch["rows"] for k in row} - {"phase", "step"})
        table = [{"phase": r["phase"], "step": r["step"], **{c: r.get(c) for c in columns}}
                 for r in watch["rows"][-TABLE_ROWS:]]
        if watch["table_id"] is None:
            watch["table_id"] = create_table_artifact(
                table, key=f"metrics-{artifact_key(stage.name)}",
                description=f"{stage.name}@{stage.version}: metrics of the last {TABLE_ROWS} log steps")
        else:  # in place, as the progress artifact: one table per stage run, not one per log step
            with get_client(sync_client=True) as client:
                client.update_artifact(watch["table_id"], ArtifactUpdate(data=json.dumps(table)))


def show_bar(bar, stage: Stage, events: list[dict]) -> None:
    """The terminal's view of the same events (a tqdm bar, drawn only when stderr is a terminal)."""
    if events:
        last = events[-1]
        if bar.total != last["total"] or not bar.desc.endswith(last["phase"]):
            bar.reset(total=last["total"])
            bar.set_description(f"{stage.name}: {last['phase']}")
        bar.update(last["step"] - bar.n)


def run_with_progress(stage: Stage, work: str, start, log) -> dict:
    """Run `start()` (the runner) in a worker thread while this task's thread follows the stage's events file."""
    path, since, offset = runner.events_path(work, stage), time.time(), 0
    watch = {"artifact_id": None, "table_id": None, "phase_start": {}, "rows": []}
    bar = tqdm(desc=stage.name, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
    with ThreadPoolExecutor(1, thread_name_prefix=f"stage-{stage.name}") as pool:
        future = pool.submit(start)
        while True:
            done = bool(wait([future], timeout=EVENT_POLL_S).done)
            events, offset = read_new_events(path, offset, since)
            show_bar(bar, stage, events)
            try:
                show_progress(stage, events, watch)
            except Exception as e:  # the UI's view must never fail the stage
                log(f"progress not shown in Prefect: {e!r}")
            if done:
                break
    bar.close()
    result = future.result()  # raises the stage's error
    if watch["artifact_id"] is not None:
        update_progress_artifact(watch["artifact_id"], 100.0,
                                 description=f"{stage.name}@{stage.version} done in {duration(result['seconds'])}")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Tasks and the flow

@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage_task(stage: Stage, root: str, work: str, run_cfg: dict, force: bool = False):
    logger = get_run_logger()
    t0 = time.time()
    result = run_with_progress(
        stage, work, lambda: runner.run_stage(stage, root=root, work_root=work, log=logger.info, force=force),
        logger.warning)
    pngs = stage_pngs(root, stage, run_cfg)
    create_markdown_artifact(key=artifact_key(stage.name), markdown=metrics_markdown(stage, result, pngs),
                             description=f"{stage.name} metrics, plots and version")
    if stage.kind == "report":
        report_md = artifacts.load(root, stage.name, stage.version, verify=False) / "report.md"
        if report_md.exists():
            create_markdown_artifact(key="run-report", markdown=inline_images(report_md.read_text(), pngs),
                                     description=f"r1flow report ({report_md})")
    result = {**result, "wall_s": round(time.time() - t0, 1)}
    if result["cached"]:
        logger.info(f"{stage.name}@{stage.version} is in the store: cached")
        return Completed(name="Cached", message=f"cached: {stage.name}@{stage.version}", data=result)
    logger.info(f"{stage.name}@{stage.version} done in {result['seconds']:.1f} s")
    return result


@flow(name="r1flow", log_prints=True)
def r1flow_pipeline(overrides: list[str] | None = None, only: str | None = None, force: bool = False) -> list[dict]:
    """Run the configured recipe (`overrides` are Hydra overrides); `only=NAME` reruns one stage from the latest
    complete versions of its inputs, `force` even when its version exists.

    Each stage's task waits on its input stages' tasks. With run.concurrent=true stages whose inputs are done run side
    by side (reward models beside evaluations); by default one at a time, in recipe order.
    """
    with crashed.hold_run_lock(get_run_context().flow_run.id):
        cfg = compose_config(overrides or [])
        stages = plan(cfg, latest_inputs_for=only)
        if only:
            stages = [s for s in stages if s.name == only]
        root, work = artifacts_root(cfg), work_root(cfg)
        run_cfg = OmegaConf.to_container(cfg.run)
        runs = {}  # stage name -> its task's future
        for stage in stages:
            task_fn = run_stage_task.with_options(name=stage.name, task_run_name=stage.name,
                                                  retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_s)
            upstream = [runs[producer] for producer in stage.inputs.values() if producer in runs]
            # Futures, not states, in wait_for, and quoted arguments: Prefect also links whatever it finds inside a
            # state's data or an argument to earlier tasks' results by id(), which CPython reuses (prefect#20558).
            # The dependencies are the recipe's inputs and nothing else.
            runs[stage.name] = task_fn.submit(quote(stage), quote(root), quote(work), quote(run_cfg), force=force,
                                              wait_for=upstream)
            if not cfg.run.concurrent:
                runs[stage.name].result()  # one at a time; raises the stage's error: the flow fails with it
        if cfg.run.concurrent:
            wait_all(list(runs.values()))
        rows = []
        for stage in stages:
            result = runs[stage.name].result()  # concurrent: waits; the first failed stage's error fails the flow
            rows.append({"stage": stage.name, "version": stage.version,
                         "state": "cached" if result["cached"] else "ran", "seconds": result["wall_s"]})
        create_table_artifact(key="run-summary", table=rows,
                              description=f"recipe {cfg.recipe.name}: what ran, what was cached")
        return rows


def serve(overrides: list[str]) -> None:
    """A deployment: start the pipeline or a single stage from the Prefect UI with parameters."""
    r1flow_pipeline.serve(name="r1flow", parameters={"overrides": overrides, "only": None, "force": False},
                          description="DeepSeek-R1 recipe; set `only` to rerun one stage, `overrides` for Hydra")
