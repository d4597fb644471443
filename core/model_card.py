"""The README written beside an exported adapter: what was trained, how, on what, and how it ended."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from core import __version__
from core.config import Config
from core.objectives import build_objective


def model_card(
    config: Config,
    *,
    base_model: str,
    data_fingerprint: str,
    final_metrics: dict[str, Any],
    pairs: int,
    steps: int,
    backend: str,
) -> str:
    objective = config.objective
    built = build_objective(objective)  # its hyper-parameters as trained, defaults resolved
    hyper = [
        f"{f.name.replace('_', ' ')} {value}"
        for f in fields(built)
        if (value := getattr(built, f.name)) or f.name == "beta"  # β always; options only when on
    ]
    if objective.nll_weight:
        hyper.append(f"NLL weight {objective.nll_weight}")
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(final_metrics.items()) if isinstance(v, (int, float)))
    train = config.train
    return f"""---
library_name: peft
base_model: {base_model}
tags: [duet, lora, {objective.name}, preference-optimization]
---

# LoRA adapter trained with Duet ({objective.name})

- Base model: `{base_model}`
- Objective: `{objective.name}` ({", ".join(hyper)})
- LoRA: rank {config.lora.rank}, alpha {config.lora.alpha}, dropout {config.lora.dropout}, targets
  `{config.lora.target_modules}`{f", last {config.lora.layers} blocks" if config.lora.layers else ""}
- Training: {steps} optimizer steps, batch {train.batch_size} pairs × {train.grad_accum} accumulation, lr {train.lr}
  ({train.schedule}, warm-up ratio {train.warmup_ratio}), weight decay {train.weight_decay}, seed {train.seed},
  backend {backend}
- Data: `{config.data.train}` ({pairs} training pairs, max length {config.data.max_length}, max prompt length
  {config.data.max_prompt_length}); token fingerprint `{data_fingerprint[:16]}`
- Duet {__version__}

## Final metrics

| metric | value |
|---|---|
{metrics}

## Use

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model}"), "path/to/this/folder")
```
"""


def checkpoint_card(
    *, base_model: str, step: int, total_steps: int, checkpoint: Path, run_dir: Path, backend: str
) -> str:
    """The README of a checkpoint's adapter (instead of PEFT's 200-line template): what it is, how to use it."""
    library = "peft" if backend == "torch" else "mlx"
    return f"""---
library_name: {library}
base_model: {base_model}
tags: [duet, lora, checkpoint]
---

# Duet checkpoint: step {step} of {total_steps}

A LoRA adapter saved during training ({backend} backend, Duet {__version__}), with the optimizer, RNG and
trainer state a resumed run continues from. It is not the final adapter: a finished run writes that to
`{run_dir / "adapter"}`, with a card of its training and final metrics.

- Base model: `{base_model}`
- Resume the run: `python -m core.run --resume {run_dir}`
- Export this checkpoint: `duet export {checkpoint} --to peft OUT` (or `--to mlx`, `--to merged`)
"""
