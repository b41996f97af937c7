"""`train`: small from-scratch (or fine-tune) training of vanilla / OutEffHop / clipped / gated models.

One call, `train(cfg)`: data -> tokenizer -> model (built, `--from` a checkpoint, or resumed) -> AdamW
loop with periodic eval and an outlier probe -> HF checkpoint + training_state.pt + train_log.csv.

Deterministic on CPU for a fixed seed: the batch of step s and its MLM mask depend only on (seed, s),
never on a global RNG, so a resumed run sees exactly the batches an uninterrupted one would.

Modules: `config` (settings, results), `loop` (the one training loop: optimizer steps, lr schedule and
halving, evaluation cadence, early stopping and the best checkpoint, checkpoints, logs, progress), and
the tasks that plug into it: `hf` (the transformer families, with `setup` for model + data, `batches`
for sampler and loss, `lm` for causal / masked LM data, `vision` for images) and `forecasting` (the
stanhop forecaster: epochs over shuffled windows, lr halving, early stopping, best checkpoint).
"""

from outlier_probe.train.config import (CONFIG_FILE, DEFAULT_STEPS, EVAL_FRACTION, LOG_COLUMNS, LOG_FILE, STATE_FILE, Precision,
                                        Progress, Schedule, TrainConfig, TrainingInterrupted, TrainResult, TrainStatus)
from outlier_probe.train.hf import train
from outlier_probe.train.lm import build_tokenizer
from outlier_probe.train.loop import lr_factor

__all__ = ["CONFIG_FILE", "DEFAULT_STEPS", "EVAL_FRACTION", "LOG_COLUMNS", "LOG_FILE", "STATE_FILE", "Precision", "Progress",
           "Schedule", "TrainConfig", "TrainResult", "TrainStatus", "TrainingInterrupted", "build_tokenizer", "lr_factor", "train"]
