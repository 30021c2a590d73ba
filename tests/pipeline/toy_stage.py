"""A stage that adds numbers: tests the orchestration (versions, caching, failure) without training anything."""

from stages.shared.errors import UserError


def run(cfg, inputs, output_dir, work_dir):
    if cfg.fail:
        raise RuntimeError("toy stage failed on purpose")
    if cfg.user_error:
        raise UserError("data/toy.jsonl line 3: field 'answer' is missing; add it or fix data.files")
    total = cfg.value + sum(int((path / "value.txt").read_text()) for path in inputs.values())
    (output_dir / "value.txt").write_text(str(total))
    print(f"toy stage wrote {total}")
    return {"value": float(total)}
