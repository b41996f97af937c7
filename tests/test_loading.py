"""Loading checkpoints: every family and weight format, GGUF, and clear errors for bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from outlier_probe.config import LoadConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.loading import load_model
from tests.conftest import EXPECTED_FAMILY, FAMILIES, FORMATS, LAYERS, make_model, tokenizer_kind

MakeCkpt = Callable[..., Path]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_format_loads_the_saved_weights(tiny_checkpoint: MakeCkpt, tiny_tokenizer, family: str, fmt: str) -> None:
    folder = tiny_checkpoint(family, fmt)
    loaded = load_model(LoadConfig(str(folder)))
    kind = tokenizer_kind(family)
    reference = make_model(family, vocab_size=len(tiny_tokenizer(kind)) if kind else 320).state_dict()
    state = loaded.model.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference), "weights differ from what was saved"
    assert not loaded.model.training
    assert loaded.info.family is EXPECTED_FAMILY[family]
    desc = loaded.describe()
    assert (desc["layers"], desc["dtype"], desc["device"], desc["attention"]) == (LAYERS, "float32", "cpu", "softmax")
    assert desc["name"] == folder.name and desc["source"] == str(folder)
    assert desc["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    if family == "vit":
        assert type(loaded.processor).__name__.startswith("ViTImageProcessor")
    else:
        assert loaded.processor is not None and len(loaded.processor) == len(tiny_tokenizer(kind))


def test_dtype_is_applied(tiny_checkpoint: MakeCkpt) -> None:
    from outlier_probe.config import DType

    loaded = load_model(LoadConfig(str(tiny_checkpoint("llama")), dtype=DType.bfloat16))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.describe()["dtype"] == "bfloat16"


def test_checkpoint_without_tokenizer_has_no_processor(tiny_checkpoint: MakeCkpt, tmp_path: Path) -> None:
    src = tiny_checkpoint("gpt2")
    dst = tmp_path / "weights-only"
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    assert load_model(LoadConfig(str(dst))).processor is None
    with_tok = load_model(LoadConfig(str(dst), tokenizer=str(src)))  # --tokenizer supplies one
    assert with_tok.processor is not None and with_tok.processor("a b")["input_ids"]


def test_gguf_round_trip(tiny_gguf: tuple[Path, torch.nn.Module], tiny_tokenizer) -> None:
    path, reference = tiny_gguf
    ids = torch.tensor([[3, 4, 5, 6, 7, 100, 250]])
    with torch.no_grad():
        expected = reference(ids).logits
    for source in (path, path.parent):  # the file, or a folder holding one .gguf and no config.json
        loaded = load_model(LoadConfig(str(source)))
        assert loaded.info.family.value == "llama" and type(loaded.model).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids).logits, expected, rtol=0, atol=1e-6)
        text = "The Python language reference"
        assert loaded.processor(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer("causal")(text)["input_ids"]
    assert load_model(LoadConfig(str(path))).name == "tiny-llama"


def test_hub_id_offline_names_the_id_and_suggests_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    with pytest.raises(ProbeError) as err:
        load_model(LoadConfig("someorg/tiny-model-that-is-not-cached"))
    msg = str(err.value)
    assert "'someorg/tiny-model-that-is-not-cached'" in msg
    assert "local folder" in msg and "\n" not in msg
    assert err.value.exit_code == 1


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match=r"checkpoint folder .*missing does not exist"):
        load_model(LoadConfig(str(tmp_path / "missing")))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ProbeError, match="has no config.json; it is not a Hugging Face checkpoint folder"):
        load_model(LoadConfig(str(tmp_path)))


def test_plain_file_is_a_usage_error(tiny_checkpoint: MakeCkpt) -> None:
    with pytest.raises(UsageError, match=r"config.json is a file; give a checkpoint folder"):
        load_model(LoadConfig(str(tiny_checkpoint("opt") / "config.json")))


def test_config_only_folder(tiny_checkpoint: MakeCkpt, tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    shutil.copy(tiny_checkpoint("opt") / "config.json", folder / "config.json")
    with pytest.raises(ProbeError, match=r"has config.json but no weights \(model.safetensors or pytorch_model.bin\)"):
        load_model(LoadConfig(str(folder)))


@pytest.mark.parametrize("fmt,weights", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin"),
                                         ("sharded", "model-00001-of-")])
def test_truncated_weights(tiny_checkpoint: MakeCkpt, tmp_path: Path, fmt: str, weights: str) -> None:
    folder = _copy(tiny_checkpoint("opt", fmt), tmp_path / "ckpt")
    target = next(p for p in sorted(folder.iterdir()) if p.name.startswith(weights))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # cut the file in half
    with pytest.raises(ProbeError, match=r"checkpoint weights in .*ckpt are corrupt or truncated") as err:
        load_model(LoadConfig(str(folder)))
    assert "\n" not in str(err.value)


class _Payload:
    def __reduce__(self):  # runs os.system on unpickling, if anything ever unpickled it unsafely
        return (os.system, ("touch PWNED",))


def test_pickle_with_code_is_refused_not_run(tiny_checkpoint: MakeCkpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _copy(tiny_checkpoint("opt", "bin"), tmp_path / "evil")
    torch.save({"lm_head.weight": _Payload()}, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProbeError, match="refuses to run; convert the checkpoint to safetensors") as err:
        load_model(LoadConfig(str(folder)))
    assert "weights_only` set to `False" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_gated_vit_reloads_its_gates_although_save_renames_the_layers(tmp_path):
    """ViT is saved under legacy key names (vit.encoder.layer.N); the gates must still come back."""
    import torch

    from outlier_probe.config import AttentionVariant, LoadConfig
    from outlier_probe.loading import load_model, save_checkpoint, set_attention
    from outlier_probe.models import Arch, build_config, build_model, shape_for

    model = build_model(build_config(Arch.vit, shape_for("micro"), image_size=16, patch_size=4, num_labels=3))
    set_attention(model, AttentionVariant.gated)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "op_gate" in name:
                p.copy_(torch.randn_like(p))
    save_checkpoint(model, tmp_path / "vit-gated")
    loaded = load_model(LoadConfig(source=str(tmp_path / "vit-gated")))
    assert loaded.attention is AttentionVariant.gated
    want = {k: v for k, v in model.state_dict().items() if "op_gate" in k}
    got = {k: v for k, v in loaded.model.state_dict().items() if "op_gate" in k}
    assert want.keys() == got.keys() and len(want) == 4
    assert all(torch.equal(want[k], got[k]) for k in want)
