"""A tiny BERT encoder with one fragile layer: an injected outlier channel inside its FFN."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.conftest import make_model

FRAGILE_LAYER = 1


def fragile_encoder(vocab_size: int, layer: int = FRAGILE_LAYER) -> torch.nn.Module:
    """BertModel (no head: hidden-state fidelity) whose block `layer` has FFN hidden channel 0 stuck at
    1000: the channel is dead for the float model (its output weights are 0), but the per-tensor range of
    the FFN activation quantizer then spans 1000 and rounds every other channel of that FFN away. The
    FFN's output is scaled x10 so that the layer matters."""
    model = make_model("bert", vocab_size=vocab_size).bert
    block = model.encoder.layer[layer]
    with torch.no_grad():
        block.intermediate.dense.weight[0].zero_()
        block.intermediate.dense.bias[0] = 1000.0
        block.output.dense.weight.mul_(10.0)
        block.output.dense.weight[:, 0] = 0.0
    model.config.architectures = ["BertModel"]
    return model.eval()


@pytest.fixture(scope="session")
def fragile_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Callable[[str], Any]) -> Path:
    tok = tiny_tokenizer("bert")
    out = tmp_path_factory.mktemp("fragile-bert")
    from transformers import BertModel

    encoder = fragile_encoder(len(tok))
    torch.manual_seed(0)
    full = BertModel(copy.deepcopy(encoder.config))  # with its pooler: a checkpoint that fills the model it names
    full.load_state_dict(encoder.state_dict(), strict=False)  # every tensor but the (seeded) pooler's
    full.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
