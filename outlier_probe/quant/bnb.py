"""The real int8 backend: bitsandbytes LLM.int8 (Linear8bitLt, outlier threshold 6.0).

Loaded through transformers' BitsAndBytesConfig (needs accelerate); on CPU it runs in eval mode.
Heads stay in float like in the simulated recipes.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from outlier_probe import arch
from outlier_probe.config import LoadConfig
from outlier_probe.errors import ProbeError
from outlier_probe.loading import LoadedModel, set_attention, weights_folder

LLM_INT8_THRESHOLD = 6.0


def load_int8(cfg: LoadConfig, loaded: LoadedModel) -> nn.Module:
    # bitsandbytes logs a line per matmul on CPU ("inputs will be cast to float16") and one about
    # optional kernels at import; expected here, so keep them off the user's stderr.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
        import transformers
    except ImportError as err:
        raise ProbeError(f"--backend bnb-int8 needs bitsandbytes and accelerate: {err}") from None
    folder, gguf = weights_folder(cfg.source)
    if gguf:
        raise ProbeError("--backend bnb-int8 needs a safetensors / PyTorch checkpoint, not GGUF")
    qcfg = transformers.BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=LLM_INT8_THRESHOLD,
        llm_int8_skip_modules=arch.head_module_names(loaded.model) or None,
    )
    device = str(loaded.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = type(loaded.model).from_pretrained(folder, quantization_config=qcfg, device_map=device,
                                                       trust_remote_code=cfg.trust_remote_code)
        except Exception as err:  # noqa: BLE001 - one clear line
            raise ProbeError(f"bitsandbytes int8 loading failed: {str(err).splitlines()[0][:200]}") from None
    if loaded.attention.value != "softmax":
        set_attention(model, loaded.attention, loaded.attention_params)
        if loaded.attention.value == "gated":
            from outlier_probe.attention import GATE
            from outlier_probe.loading import _load_extra_tensors  # noqa: PLC2701 - same package

            _load_extra_tensors(model, folder, marker=GATE)
    return model.eval()
