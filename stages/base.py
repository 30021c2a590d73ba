"""Stage `base`: the checkpoint every recipe starts from.

- model.source == "build" (the embedded default): build the tiny tokenizer and model offline (stages/models.py) and
  pre-train them on the task world's plain corpus (cfg.corpus) with TRL's SFTTrainer as plain language modelling, so
  that R1-Zero starts from a model that answers some problems right and almost never in the <think>/<answer> format.
  The artifact is a plain save_pretrained (safetensors) directory.
- a hub id or a local path: the stage records the source (stages/models.write_model_ref), pinned: a hub id resolves
  to the commit sha of the requested revision (from the local cache when HF_HUB_OFFLINE=1; a model that is not cached
  fails fast naming model.source), a local directory is fingerprinted file by file (sha256). With max_steps > 0 the
  model is also pre-trained further on cfg.corpus and saved like the built one.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from stages import training
from stages.errors import UserError


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    training.setup(cfg)
    source = str(cfg.model.source)
    if source == "build":
        return _build_and_pretrain(cfg, Path(output_dir), Path(work_dir), callbacks)
    metrics = _record_source(cfg, Path(output_dir))
    if int(cfg.get("max_steps") or 0) > 0 and cfg.get("corpus"):
        from stages import models

        src, revision = models.model_source(Path(output_dir))
        model = models.load_model(src, revision=revision, trust_remote_code=bool(cfg.model.get("trust_remote_code")),
                                  dtype=training.model_dtype(cfg.hardware),
                                  device="cpu" if training.on_cpu(cfg.hardware) else "cuda")
        tokenizer = models.load_tokenizer(src, revision=revision,
                                          trust_remote_code=bool(cfg.model.get("trust_remote_code")))
        for f in Path(output_dir).iterdir():  # the reference is replaced by the trained weights
            f.unlink()
        metrics.update(_pretrain(cfg, model, tokenizer, Path(output_dir), Path(work_dir), callbacks))
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# A hub id or a local path

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_source(cfg, output_dir: Path) -> dict:
    from stages import models

    source = str(cfg.model.source)
    revision = cfg.model.get("revision")
    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        if not local.is_dir():
            raise UserError(f"model.source={source!r} is not a directory; give a save_pretrained directory or a "
                            f"hub id (org/name)")
        files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not any(p.name == "config.json" for p in files):
            raise UserError(f"model.source={source!r} has no config.json; point it at a save_pretrained directory")
        hashes = {str(p.relative_to(local)): _sha256(p) for p in files}
        pinned = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in hashes.items()).encode()).hexdigest()
        models.write_model_ref(output_dir, str(local.resolve()), None)
        (output_dir / "source_files.json").write_text(__import__("json").dumps(hashes, indent=1))
        print(f"base: local model {local} ({len(files)} files, content sha256 {pinned[:12]})", flush=True)
        return {"source_kind": "local", "files": len(files), "content_sha256": pinned}

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    commit = _resolve_hub_revision(source, revision, offline)
    models.write_model_ref(output_dir, source, commit)
    print(f"base: hub model {source}@{revision or 'main'} pinned to {commit}", flush=True)
    return {"source_kind": "hub", "revision": commit}


def _resolve_hub_revision(source: str, revision: str | None, offline: bool) -> str:
    """The commit sha of source@revision: from the local cache when offline, from the hub otherwise."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        if offline:
            path = snapshot_download(source, revision=revision, local_files_only=True,
                                     allow_patterns=["config.json"])
            return Path(path).name  # snapshots/<commit sha>
        return HfApi().model_info(source, revision=revision).sha
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError) as e:
        raise UserError(
            f"model.source={source!r} (revision {revision or 'main'}) is not in the local Hugging Face cache and the "
            f"hub is offline (HF_HUB_OFFLINE=1). Download it first (`HF_HUB_OFFLINE=0 huggingface-cli download "
            f"{source}`), unset HF_HUB_OFFLINE, or set model.source to a local directory. ({type(e).__name__})"
        ) from None
    except HfHubHTTPError as e:
        raise UserError(f"model.source={source!r} revision {revision or 'main'} could not be resolved on the hub: "
                        f"{e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# The embedded tiny model

def _build_and_pretrain(cfg, output_dir: Path, work_dir: Path, callbacks) -> dict:
    from stages import data, models

    t0 = time.time()
    corpus_files = [str(data.resolve_path(p)) for p in cfg.model.tokenizer.corpus]
    tokenizer = models.build_tokenizer(corpus_files, int(cfg.model.tokenizer.vocab_size))
    model = models.build_model(dict(cfg.model.architecture), tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base: built {type(model).__name__} with {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)} "
          f"({time.time() - t0:.1f}s)", flush=True)
    metrics = _pretrain(cfg, model, tokenizer, output_dir, work_dir, callbacks)
    metrics["parameters"] = n_params
    return metrics


def _pretrain(cfg, model, tokenizer, output_dir: Path, work_dir: Path, callbacks) -> dict:
    """Language modelling on cfg.corpus (rows with a `text` field), then save and check on the held-out split."""
    from datasets import Dataset

    from stages import data

    t0 = time.time()
    rows = data.load_rows(cfg.corpus, ["text"], "base.corpus")
    dataset = Dataset.from_list([{"text": r["text"]} for r in rows])
    max_steps = int(cfg.max_steps)
    fields = dict(max_steps=max_steps, per_device_train_batch_size=int(cfg.batch_size), completion_only_loss=False)
    packing = cfg.get("packing", "wrapped")
    if packing in ("wrapped", "bfd", "bfd_split"):
        # wrapped: the corpus as one stream cut into max_length rows (no padding, documents separated by eos);
        # bfd: whole documents binned into rows, padding-free with per-document positions (varlen attention, GPU)
        fields.update(packing=True, packing_strategy=packing)
    elif packing:
        raise UserError(f"base.packing={packing!r}; use wrapped, bfd, bfd_split or null (padded batches)")
    else:
        fields["train_sampling_strategy"] = "group_by_length" if cfg.get("group_by_length") else "random"
    if cfg.get("lr_scheduler_type") == "warmup_stable_decay":
        fields["lr_scheduler_kwargs"] = {"num_decay_steps": max(1, int(max_steps * float(cfg.get("decay_ratio", 0.25)))),
                                         "min_lr_ratio": 0.0}
    model, trainer = training.sft(cfg, model, tokenizer, dataset, work_dir, name="base", callbacks=callbacks,
                                  **fields)
    train_s = time.time() - t0
    metrics = training.finish(output_dir, model, tokenizer, trainer)
    metrics["train_seconds"] = train_s
    metrics.update(_heldout(cfg, model, tokenizer))
    return training.clean_metrics(metrics)


def _heldout(cfg, model, tokenizer) -> dict:
    """Greedy held-out check in the R1-Zero template: how many the base answers right, and in which format."""
    n = int(cfg.get("eval_samples") or 0)
    if n <= 0 or not cfg.get("eval_file"):
        return {}
    rows = training.eval_rows(cfg.eval_file, n, name="base.eval_file")
    out = {}
    for template in cfg.get("eval_templates") or ["r1_zero"]:
        result = training.evaluate(model, tokenizer, rows, template=template,
                                   max_new_tokens=int(cfg.get("eval_max_new_tokens", 96)), keep_samples=3)
        for s in result.pop("samples", []):
            print(f"  [{template}] {s['prompt']!r} -> {s['completion']!r} (gold {s['gold']})", flush=True)
        print(f"base: held-out [{template}] accuracy={result['accuracy']:.3f} "
              f"format={result['format_rate']:.3f} len={result['mean_length']:.1f}", flush=True)
        out.update(training.eval_metrics(f"eval_{template}", result))
    return out
