"""The stages of the DeepSeek-R1 recipe, one module each: base, cold_start_sft, reasoning_grpo, rejection_sampling,
reward_model, merged_sft_alignment, distill, evaluate, report.

Each module exposes `run(cfg, inputs, output_dir, work_dir) -> metrics` and reads top to bottom. A stage knows nothing
of Prefect and never imports another stage: what two stages share lives in `stages.shared`, one module per concern.
"""
