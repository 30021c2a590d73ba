"""Where a NaN gradient comes from: rerun a failed training stage's attempt in-process, with autograd's anomaly mode
and probes on weights, activations and gradients.

    python benchmarks/nan_probe.py reasoning_grpo hardware=gpu hardware.weights_dtype=bfloat16 ... anomaly
    python benchmarks/nan_probe.py reasoning_grpo hardware=gpu hardware.weights_dtype=float32 ...

STAGE, then the Hydra overrides of the run (its inputs must be in that run's artifact store). The stage runs
in-process on fresh output and work directories (for merged_sft_alignment, a previous attempt's finished merged SFT
is copied in, so only its RL part runs again). Printed: each
weight tensor's largest magnitude at the start of training, per training forward the largest activation after each
decoder layer and of the logits, per step the parameters whose gradient is not finite, and with `anomaly` the forward
operation whose backward first produced a NaN (torch.autograd.detect_anomaly).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def probe_callback():
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.handles, self.last = [], {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            base = getattr(model, "module", model)
            big = sorted(((p.detach().abs().max().item(), n, str(p.dtype)) for n, p in base.named_parameters()),
                         reverse=True)
            bad = [n for n, p in base.named_parameters() if not torch.isfinite(p).all()]
            print(f"probe: {len(big)} weight tensors, dtype {big[0][2]}, non-finite: {bad[:5]}; largest |w|: "
                  + ", ".join(f"{n}={v:.3g}" for v, n, _ in big[:4]), flush=True)
            layers = list(base.model.layers)
            watch = {f"layer{i}": layers[i] for i in sorted({0, len(layers) // 2, len(layers) - 1})}
            watch["embed"], watch["norm"], watch["lm_head"] = base.model.embed_tokens, base.model.norm, base.lm_head
            for name, module in watch.items():
                self.handles.append(module.register_forward_hook(self._hook(name)))

        def _hook(self, name):
            def hook(module, inputs, output):
                if module.training and torch.is_grad_enabled():
                    t = output[0] if isinstance(output, tuple) else output
                    self.last[name] = (t.detach().float().abs().max().item(), str(t.dtype),
                                       bool(torch.isfinite(t).all()))
            return hook

        @staticmethod
        def _checksum(model):
            with torch.no_grad():
                return sum(p.double().sum().item() for p in getattr(model, "module", model).parameters())

        def on_step_end(self, args, state, control, model=None, **kw):
            self.before_save = self._checksum(model)

        def on_save(self, args, state, control, model=None, **kw):
            print(f"probe: checkpoint at step {state.global_step}: weights checksum {self.before_save!r} -> "
                  f"{self._checksum(model)!r}", flush=True)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            base = getattr(model, "module", model)
            bad = [(n, str(p.grad.dtype)) for n, p in base.named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            finite = [p.grad.float().abs().max().item() for p in base.parameters()
                      if p.grad is not None and torch.isfinite(p.grad).all()]
            print(f"probe: step {state.global_step + 1} largest finite |grad| {max(finite, default=0):.3g}", flush=True)
            print(f"probe: step {state.global_step + 1} training forward max |activation| "
                  + ", ".join(f"{k}={v[0]:.3g}({v[1]}{'' if v[2] else ', NON-FINITE'})" for k, v in self.last.items())
                  + f"; non-finite gradients: {len(bad)} tensors {bad[:6]}", flush=True)

    return Probe()


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from pipeline import artifacts
    from pipeline.plan import artifacts_root, compose_config, plan, work_root

    name, anomaly = argv[0], "anomaly" in argv
    overrides = [a for a in argv[1:] if "=" in a]
    cfg = compose_config(overrides)
    stage = next(s for s in plan(cfg) if s.name == name)
    root = artifacts_root(cfg)
    inputs = {role: artifacts.load(root, producer, stage.input_versions[role])
              for role, producer in stage.inputs.items()}
    label = "_".join(a.split(".")[-1].replace("=", "-") for a in overrides if a.startswith(("hardware.", f"{name}.")))
    work = Path(tempfile.mkdtemp(prefix=f"probe_{name}_"))
    previous = Path(work_root(cfg)) / name / stage.version
    if (previous / "sft" / "model").is_dir():  # merged_sft_alignment: keep the finished SFT, rerun the RL from step 0
        shutil.copytree(previous / "sft" / "model", work / "sft" / "model")
    out = Path(tempfile.mkdtemp(prefix="probe_out_"))
    import importlib

    module = importlib.import_module(f"stages.{stage.module}")
    print(f"probe: {name}@{stage.version} [{label}] anomaly mode {anomaly}, "
          f"weights {stage.config['hardware'].get('weights_dtype')}", flush=True)
    torch.manual_seed(int(stage.config.get("seed", 0)))
    t0 = time.time()
    try:
        with torch.autograd.set_detect_anomaly(anomaly):
            metrics = module.run(OmegaConf.create(stage.config), inputs, out, work, callbacks=[probe_callback()])
    except Exception as e:
        traceback.print_exc()
        print(f"probe: [{label}] FAILED after {time.time() - t0:.0f} s: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return 1
    history = [json.loads(l) for l in (out / "log_history.jsonl").read_text().splitlines() if l.strip()]
    norms = [(e.get("step"), e.get("grad_norm")) for e in history if "grad_norm" in e]
    print(f"probe: [{label}] finished in {time.time() - t0:.0f} s; grad norms {norms}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
