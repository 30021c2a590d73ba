"""What the stages share, one module per concern. A stage imports these; these never import a stage.

- `hardware`: device, precision, threads, seeds, FSDP, the TRL arguments that follow from `conf/hardware/*.yaml`
- `attention`: GPU attention kernels (padding-free varlen flash attention, no cuDNN), compilation, Liger
- `trainers`: TRL trainer construction (SFT, GRPO arguments), resume from checkpoints, progress callback, saving
- `logs`: a training run's log history: JSON lines, summaries for the manifest
- `heldout`: held-out accuracy of a model being trained (before/after checks, the RL accuracy curve)
- `generation`: the one place that generates text: vLLM's offline engine, or transformers `generate`
- `models`: building the tiny model, loading checkpoints and tokenizers, recording hub/local sources
- `data`: reading data files (JSONL, parquet, hub) with column mappings; the one atomic writer
- `templates`: the R1 and R1-Zero prompt formats, answer extraction
- `reward_models`: loading and scoring with reward models (helpfulness on the summary, harmlessness on the whole)
- `judge`: an optional generative judge (yes/no) for answers the rules cannot check, in rejection sampling
- `rewards/`: the rule rewards (accuracy, format, language consistency, guards), their registry, and the bounded
  verification pool (pebble) that answer checks run in, set by conf/verification/
- `plots`: the PNG figures (RL curves, loss, the report's charts)
- `errors`: `UserError`, the bad-input error the CLI turns into exit code 2

A new reward goes in `rewards/` (one module, registered by name); a new hardware knob is a key of conf/hardware/*.yaml
read in `hardware` or `attention`; a new stage is a module in `stages/` plus an entry in a recipe (conf/recipe/).
"""
