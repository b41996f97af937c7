"""`retrofit`: fine-tune a pretrained checkpoint into outlier-efficient attention twins, next to a vanilla control.

One call, `run_retrofit(cfg)`: load the checkpoint once -> pack the data once (held-out, calibration and training
sequences are disjoint parts of one seeded order) -> for each seed and each twin (the vanilla control first):
copy the pretrained weights, swap the attention variant in at its near-vanilla start, measure the start,
fine-tune with the same batches / optimizer / schedule, measure again. The settings and the numbers (`Twin`
records) are the dataclasses of `retrofit_config.py`; `report/retrofit_report.py` writes them.

The optimizer, warmup / decay schedule and dropout handling are train's (`train.lr_factor`, AdamW on the same
weight-decay groups, dropout off); the loss is the checkpoint's own objective or a distillation onto the frozen
original (for encoders without a head, such as MiniLM).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from outlier_probe import arch
from outlier_probe.config import AttentionVariant, DataConfig, Device, LoadConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.loading import LoadedModel
from outlier_probe.retrofit_config import RetrofitConfig, RetrofitResult, Twin
from outlier_probe.retrofit_head import save_twin, shared_head_for
from outlier_probe.retrofit_measure import measure, probe
from outlier_probe.retrofit_objective import HeldOut, Objective, held_out_metric, objective_loss, resolve_objective, teacher_targets
from outlier_probe.train import Schedule, TrainConfig, lr_factor

Log = Callable[[str], None]


def make_twin(original: LoadedModel, variant: AttentionVariant, params: dict[str, float]) -> LoadedModel:
    """A deep copy of the pretrained model with `variant` swapped in at its near-vanilla start."""
    from outlier_probe.loading import set_attention
    from outlier_probe.train.setup import _disable_dropout

    model = copy.deepcopy(original.model)
    model.requires_grad_(True)  # the original is frozen (it is the distillation teacher)
    used = set_attention(model, variant, params) if variant is not AttentionVariant.softmax else {}
    _disable_dropout(model)
    return LoadedModel(model, original.processor, arch.model_info(model), f"{original.name}-{variant.value}", original.source, variant, used)


def train_config(cfg: RetrofitConfig, seed: int) -> TrainConfig:
    """The train settings a twin is fine-tuned with: train's schedule and optimizer, from the retrofit knobs."""
    return TrainConfig(init_from=cfg.source, steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                       warmup=cfg.warmup, schedule=Schedule.cosine, weight_decay=0.01, seed=seed, eval_every=cfg.eval_every)


def fine_tune(twin: LoadedModel, teacher: nn.Module | None, train_ids: torch.Tensor, probe_batch: dict[str, torch.Tensor],
              evaluate: HeldOut, cfg: RetrofitConfig, objective: Objective, seed: int, log: Log | None = None,
              head: nn.Module | None = None) -> tuple[list[dict[str, Any]], float]:
    """AdamW fine-tuning of `twin` (and its copy of the mlm-head) in place; -> (curve rows, mean seconds per step).
    Batch s is the s-th slice of a seed-ordered permutation of the training sequences, its MLM mask seeded by
    (seed, s): identical for every twin."""
    from outlier_probe.evaluation import mask_for_mlm
    from outlier_probe.train.loop import _param_groups

    tcfg = train_config(cfg, seed)
    model, dev = twin.model, twin.device
    groups = _param_groups(model, tcfg.weight_decay) + ([{"params": list(head.parameters()), "weight_decay": tcfg.weight_decay}] if head else [])
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=tcfg.betas, fused=dev.type == "cuda" or None)  # as train's
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(train_ids), generator=gen) for _ in range(math.ceil(cfg.steps * cfg.batch_size / len(train_ids)))])
    bf16 = dev.type == "cuda"
    rows, acc, n_acc, seconds = [], torch.zeros((), device=dev), 0, 0.0

    def row(step: int) -> None:
        nonlocal acc, n_acc
        outl = probe(twin, probe_batch)
        rows.append({"step": step, "train_loss": float(acc) / n_acc if n_acc else math.nan, "eval_loss": evaluate(model, head), **outl})
        acc, n_acc = torch.zeros((), device=dev), 0
        if log:
            r = rows[-1]
            log(f"  step {step:>5}  loss {r['train_loss']:.4g}  eval {r['eval_loss']:.4g}  "
                f"avg kurtosis {r['avg_kurtosis']:.4g}  max inf-norm {r['max_inf_norm']:.4g}")

    row(0)
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        model.train()
        if head is not None:
            head.train()
        batch = {"input_ids": train_ids[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]}
        if evaluate.masked:
            batch = mask_for_mlm([batch], twin.processor, seed=(seed + 1) * 2**32 + step)[0]
        batch = {k: v.to(dev) for k, v in batch.items()}
        target = teacher_targets(teacher, batch["input_ids"]) if objective is Objective.distill else None
        for group in opt.param_groups:
            group["lr"] = tcfg.lr * lr_factor(tcfg, step, step / cfg.steps)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective_loss(model, batch, objective, target, head)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc += loss.detach()
        n_acc += 1
        seconds += time.perf_counter() - t0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            if not math.isfinite(float(acc)):
                raise ProbeError(f"{twin.attention.value} twin diverged at step {step + 1}; lower --lr")
            row(step + 1)
    model.eval()
    if head is not None:
        head.eval()
    return rows, seconds / cfg.steps


def run_retrofit(cfg: RetrofitConfig, log: Log | None = None, done: dict[tuple[str, int], Twin] | None = None,
                 on_twin: Callable[[Twin], None] | None = None) -> RetrofitResult:
    """The whole `retrofit` job. `done`: twins finished by an interrupted run (--resume), not redone."""
    import transformers

    from outlier_probe.data import text_batches
    from outlier_probe.loading import load_model
    from outlier_probe.offload import require_in_memory
    from outlier_probe.stats.run import settings_of
    from outlier_probe.train.loop import _threads

    transformers.logging.set_verbosity_error()
    device = cfg.device.resolve()
    torch.set_num_threads(_threads(cfg.threads))
    original = load_model(cfg.placement.apply(LoadConfig(source=cfg.source, device=Device(device), tokenizer=cfg.tokenizer)))
    require_in_memory(original.model, "retrofit fine-tunes copies of every weight")
    info = original.info
    objective = resolve_objective(info.task, cfg.objective)
    if original.processor is None:
        raise UsageError(f"{cfg.source} has no tokenizer; pass --tokenizer DIR")
    if info.family is arch.Family.generic:
        raise UsageError(f"retrofit needs a known family to swap attention in; {info.model_type!r} is not one")
    if original.attention is not AttentionVariant.softmax:
        raise UsageError(f"{cfg.source} already uses {original.attention.value} attention; retrofit starts from a vanilla checkpoint")
    if info.max_positions is not None and cfg.seq_len > info.max_positions:
        raise UsageError(f"--seq-len {cfg.seq_len} is longer than the model's {info.max_positions} positions")
    for variant in cfg.variants:  # a variant the family cannot host: fail before any work
        make_twin(original, variant, cfg.params(variant))
    original.model.eval()
    for p in original.model.parameters():
        p.requires_grad_(False)

    n_eval, n_calib = cfg.eval_samples, 4 * cfg.batch_size
    eval_cfg = cfg.data_config(n_eval, 0)
    n_train = _available(cfg, original, n_eval + n_calib)
    held = text_batches(original.processor, eval_cfg, info.max_positions)
    train = text_batches(original.processor, cfg.data_config(n_train, n_eval + n_calib), info.max_positions)
    train_ids = torch.cat([b["input_ids"] for b in train.batches])
    probe_batch = held.batches[0]
    if log:
        log(f"{original.name}: {info.family.value} {info.task.value}, objective {objective.value}; "
            f"{n_train} training / {n_eval} held-out / {n_calib} calibration sequences of {cfg.seq_len} tokens")
    dev = original.device
    reference = [teacher_targets(original.model, b["input_ids"].to(dev)) for b in held.batches]
    evaluate = held_out_metric(original, held.batches, objective, reference)
    shared_head, head_info = shared_head_for(cfg.head_steps, cfg.batch_size, original, objective, train_ids, evaluate, log)
    measured = measure(original, held, reference, eval_cfg, evaluate, shared_head)
    teacher = original.model if objective is Objective.distill else None
    twins, starts = [], {}
    done = done or {}
    for seed in cfg.seeds:
        for variant in (AttentionVariant.softmax, *cfg.variants):
            key = (variant.value, seed)
            if key in done:
                twins.append(done[key])
                starts.setdefault(variant, done[key].before)
                continue
            if log:
                log(f"{variant.value} (seed {seed})")
            twin = make_twin(original, variant, cfg.params(variant))
            head = copy.deepcopy(shared_head).requires_grad_(True) if shared_head is not None else None
            torch.manual_seed(seed)
            if variant not in starts:
                starts[variant] = measured if variant is AttentionVariant.softmax else measure(twin, held, reference, eval_cfg, evaluate, head)
            curve, step_s = fine_tune(twin, teacher, train_ids, probe_batch, evaluate, cfg, objective, seed, log, head)
            after = measure(twin, held, reference, eval_cfg, evaluate, head)
            saved = str(save_twin(twin, head, cfg.save / f"{variant.value}-s{seed}")) if cfg.save else None
            record = Twin(variant, seed, twin.attention_params, starts[variant], after, curve, step_s, saved)
            twins.append(record)
            if on_twin:
                on_twin(record)
            del twin
    settings = {**settings_of(cfg), "objective_resolved": objective.value, "device": device, "threads": torch.get_num_threads(),
                "train_sequences": n_train, "eval_sequences": n_eval, "calibration_sequences": n_calib,
                "optimizer": "AdamW", **{k: v for k, v in settings_of(train_config(cfg, 0)).items() if k in ("betas", "weight_decay", "grad_clip", "min_lr_ratio", "schedule")}}
    return RetrofitResult(original.describe(), objective, measured, twins, settings, {"held_out": held.describe(), "train": train.describe()},
                          head_info)


def _available(cfg: RetrofitConfig, original: LoadedModel, used: int) -> int:
    """Sequences left for training after the held-out and calibration ones (an error if not one batch)."""
    from outlier_probe.data import read_text, special_overhead, tokenize_text

    text, _, _ = read_text(DataConfig(path=cfg.data, include=cfg.include))
    body = cfg.seq_len - special_overhead(original.processor)
    if body < 1:
        raise UsageError(f"--seq-len {cfg.seq_len} leaves no room next to the tokenizer's special tokens")
    available = len(tokenize_text(original.processor, text)) // body - used
    if available < cfg.batch_size:
        raise UsageError(f"the data holds {max(available, 0)} training sequences of {cfg.seq_len} tokens after {used} held-out and "
                         f"calibration ones: fewer than one batch of {cfg.batch_size}; give more data or a smaller --seq-len / --batch-size")
    return available


