"""Byte-level BPE tokenizers trained on the data (for models trained from scratch and for tests)."""

from __future__ import annotations

from typing import Any, Iterable

CAUSAL_SPECIALS = ("<|endoftext|>", "<pad>")
MLM_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, masked: bool = False) -> Any:
    """Train a byte-level BPE on `texts`; returns a transformers PreTrainedTokenizerFast.

    Causal tokenizers add nothing around a sequence; masked-LM ones wrap it in [CLS] ... [SEP]
    (the delimiters where BERT-style outliers form) and provide [MASK].
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(MLM_SPECIALS if masked else CAUSAL_SPECIALS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if masked:
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>")
