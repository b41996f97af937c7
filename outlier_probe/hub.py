"""Hugging Face hub access for hub ids: decide up front whether the network can be used.

huggingface_hub retries an unreachable host five times with back-off (about 25 s) and logs a line per
retry. One quick request tells instead: when it fails, or when HF_HUB_OFFLINE=1 is set, checkpoints
are read from the local cache only (`local_files_only=True`), and a miss is one clear line that says why.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from outlier_probe.errors import ProbeError

PROBE_TIMEOUT_S = 5.0


def quiet() -> None:
    """No retry warnings or progress bars from huggingface_hub on stderr: errors are ours to report."""
    from huggingface_hub.utils import disable_progress_bars, logging

    logging.set_verbosity_error()
    disable_progress_bars()


@lru_cache(maxsize=1)
def offline_reason() -> str | None:
    """None when the hub can be used; else why not ("HF_HUB_OFFLINE=1 is set", "no network (...)")."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1 is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except Exception as err:  # noqa: BLE001 - DNS, refused, proxy, TLS, timeout: all mean "no hub"
        detail = " ".join(str(err).split())[:80] or type(err).__name__
        return f"no network ({constants.ENDPOINT} unreachable: {detail})"
    return None


def access_kwargs() -> dict[str, Any]:
    """Keyword arguments for from_pretrained of a hub id: the local cache only when the hub cannot be used."""
    quiet()
    return {"local_files_only": True} if offline_reason() else {}


def not_loaded(source: str) -> ProbeError:
    """The one line for a hub id that could not be loaded without the network."""
    reason = offline_reason()
    if reason and reason.startswith("HF_HUB_OFFLINE"):
        return ProbeError(f"could not load {source!r}: {reason} and it is not in the local Hugging Face cache; "
                          f"use a local folder, or download it while online")
    return ProbeError(f"could not load {source!r} from the Hugging Face hub: {reason}; it is not in the local cache: "
                      f"use a local folder or set HF_HUB_OFFLINE=1 with a cached copy")
