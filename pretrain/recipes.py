"""Measured pretraining recipes per model size: the defaults `ehrfm pretrain --size S` starts from.

Precedence: PretrainConfig's defaults < the size's recipe < ``--config`` YAML < ``key=value`` overrides < flags.
Each recipe records the measurement that chose it (2-core CPU, the demo cohort: 150 Synthea patients aged
50-90, seed 7; 223k pretraining tokens; bigram reference 5.63 over all targets). Sizes without a recipe
(small, medium) keep PretrainConfig's defaults: they were not swept on this hardware.
"""

from __future__ import annotations

RECIPES: dict[str, dict[str, object]] = {
    # Mini Llama, lr 3e-3, 8 x 256 tokens per step: val ppl 6.59 at step 150, 4.94 at 200 (below the bigram
    # from step 200), 3.41 at 600; 0.25 s/step on 2 cores (README "Recipes", `ehrfm study convergence`)
    "mini": {
        "optim.lr": 3e-3,
        "optim.warmup_fraction": 0.1,
        "data.context_length": 256,
        "data.batch_size": 8,
        "train.max_steps": 600,
    },
    # Tiny Llama, 100 steps of 8 x 256 tokens: val ppl 69.5 (lr 5e-4), 30.2 (3e-3), 76.0 (1e-2), 84.4 (2e-2).
    # Only the learning rate was swept; context, batch and steps keep PretrainConfig's defaults.
    "tiny": {"optim.lr": 3e-3, "optim.warmup_fraction": 0.1},
}


def recipe_overrides(size: str) -> list[str]:
    """The size's recipe as ``key=value`` strings (empty for sizes without a measured recipe)."""
    return [f"{key}={value}" for key, value in RECIPES.get(size, {}).items()]
