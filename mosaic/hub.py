"""Offline-first access to the Hugging Face hub.

An unreachable hub makes transformers and datasets retry for about half a minute per file. We probe
once, quickly, and switch both libraries to their offline mode when the hub cannot be reached, so
cached hub files still load and missing ones fail at once with a clear message.

The probe goes where the HTTP clients would go: the ``HF_ENDPOINT`` mirror if one is set, or the
HTTP(S) proxy configured for it (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``, unless ``NO_PROXY``
exempts the endpoint's host). A TCP connect is enough: we only ask whether a route exists.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.request
from urllib.parse import urlsplit

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080}


def offline_requested() -> bool:
    """True if any of the offline variables is set to a true value (as huggingface_hub reads them)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def _host_port(url: str, default_scheme: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL; a bare ``host[:port]`` gets ``default_scheme``."""
    parts = urlsplit(url if "://" in url else f"{default_scheme}://{url}")
    scheme = parts.scheme.lower()
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return scheme, parts.hostname, parts.port or DEFAULT_PORTS.get(scheme, 443)


def probe_target(endpoint: str | None = None) -> tuple[str, int]:
    """The (host, port) a connection to the hub opens first: its proxy if one applies, else the endpoint.

    ``endpoint`` defaults to ``HF_ENDPOINT`` or https://huggingface.co. Proxies and ``NO_PROXY`` are
    read as urllib (and so requests) reads them. Raises ValueError for a URL without a host or with a
    bad port.
    """
    endpoint = endpoint or os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
    scheme, host, port = _host_port(endpoint, "https")
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        _, host, port = _host_port(proxy, "http")
    return host, port


@functools.cache
def _connects(host: str, port: int, timeout: float) -> bool:
    """One TCP connect per target and process."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(host: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the hub (``host``: a URL or bare host name; default ``HF_ENDPOINT``) can be reached.

    False at once when an offline variable is set, or when the endpoint or proxy URL is malformed.
    """
    if offline_requested():
        return False
    try:
        target = probe_target(host)
    except ValueError:
        return False
    return _connects(*target, timeout)


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
