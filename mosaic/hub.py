"""Offline-first access to the Hugging Face hub.

An unreachable hub makes transformers and datasets retry for about half a minute per file. We probe
once, quickly, and switch both libraries to their offline mode when the hub cannot be reached, so
cached hub files still load and missing ones fail at once with a clear message.
"""

from __future__ import annotations

import functools
import os
import socket

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@functools.cache
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_VARS):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Make transformers, datasets and huggingface_hub use only their local caches."""
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    try:  # huggingface_hub reads the variable at import time; update the constant too
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass
    try:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def ensure_offline_if_unreachable(force_offline: bool = False) -> bool:
    """Switch to offline mode when asked or when the hub is unreachable; returns True if offline."""
    offline = force_offline or not hub_reachable()
    if offline:
        go_offline()
    return offline
