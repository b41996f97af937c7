"""Language-modelling tasks (causal LM, masked LM): tokenizers and packed text sequences."""

from __future__ import annotations

from typing import Any

import torch

from outlier_probe import arch, data
from outlier_probe.config import DataConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.models import Arch
from outlier_probe.train.batches import _Data, _eval_batches, _split
from outlier_probe.train.config import TrainConfig


def _text_data(cfg: TrainConfig, tokenizer: Any, task: arch.Task, max_positions: int | None, text: str, desc: str) -> _Data:
    if max_positions is not None and cfg.seq_len > max_positions:
        raise UsageError(f"--seq-len {cfg.seq_len} is longer than the model's {max_positions} positions")
    prefix, suffix = data.special_tokens(tokenizer)
    body = cfg.seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise UsageError(f"--seq-len {cfg.seq_len} leaves no room next to the tokenizer's special tokens")
    ids = torch.tensor(data.tokenize_text(tokenizer, text), dtype=torch.long)
    n = len(ids) // body
    if n < 2:
        raise ProbeError(f"data has {len(ids):,} tokens: too few for a training and an eval sequence of {cfg.seq_len}; "
                         "use a shorter --seq-len or more data")
    chunks = ids[: n * body].view(n, body)
    parts = [torch.tensor(prefix, dtype=torch.long).expand(n, -1), chunks, torch.tensor(suffix, dtype=torch.long).expand(n, -1)]
    chunks = torch.cat(parts, dim=1).contiguous()  # (n, seq_len)
    n_eval = _split(n)
    train, held = chunks[: n - n_eval], chunks[n - n_eval :][: cfg.eval_samples]
    plain = _eval_batches({"input_ids": held}, cfg.batch_size)
    evals = plain
    if task is arch.Task.masked_lm:
        from outlier_probe.evaluation import mask_for_mlm

        evals = mask_for_mlm(plain, tokenizer, seed=cfg.seed)
    description = {"data": desc, "corpus_tokens": len(ids), "train_sequences": len(train), "eval_sequences": len(held),
                   "held_out_sequences": n_eval, "seq_len": cfg.seq_len}
    return _Data(task, {"input_ids": train}, evals, plain[0], cfg.seq_len, description)



def build_tokenizer(cfg: TrainConfig) -> Any:
    """The byte-level BPE tokenizer train() would fit on cfg's data (deterministic). Save it and pass its folder as
    `tokenizer=` to share one tokenizer between runs (e.g. vanilla / OutEffHop twins) without refitting it."""
    if cfg.arch is Arch.vit:
        raise UsageError("vit trains on images: it needs no tokenizer")
    text, _, _ = data.read_text(DataConfig(path=cfg.data, include=cfg.include), max_chars=cfg.max_chars)
    return _train_tokenizer(text[: cfg.max_chars] if cfg.max_chars else text, cfg.vocab_size, masked=cfg.arch is Arch.bert)


def _load_tokenizer(source: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - one clear line
        raise ProbeError(f"could not load a tokenizer from {source} ({str(err).splitlines()[0][:160] if str(err) else type(err).__name__})") from None


def _train_tokenizer(text: str, vocab_size: int, masked: bool) -> Any:
    from outlier_probe.tokenization import train_bpe_tokenizer

    lines = text.splitlines(keepends=True)
    blocks = ("".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000))
    return train_bpe_tokenizer(blocks, vocab_size=vocab_size, masked=masked)



def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}

