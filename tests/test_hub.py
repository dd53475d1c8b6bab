"""The hub probe goes where the HTTP clients would: HF_ENDPOINT, or the proxy configured for it."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from mosaic import hub


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No endpoint, proxy or offline variable from the outer environment, and no cached probe."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in (*hub.OFFLINE_VARS, "HF_ENDPOINT", "REQUEST_METHOD"):
            monkeypatch.delenv(name)
    hub._connects.cache_clear()


@pytest.fixture
def live_port():
    """Port of a local TCP server that accepts and closes connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.05)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_probe_target_from_endpoint_proxy_and_no_proxy(monkeypatch):
    assert hub.probe_target() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://Mirror.example/hf")
    assert hub.probe_target() == ("mirror.example", 80)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:8443")
    assert hub.probe_target() == ("mirror.example", 8443)
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy.example:3128")  # for http URLs only
    assert hub.probe_target() == ("mirror.example", 8443)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")  # no scheme: http, as requests assumes
    assert hub.probe_target() == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "localhost,.example")
    assert hub.probe_target() == ("mirror.example", 8443)
    assert hub.probe_target("huggingface.co") == ("proxy.example", 3128)  # bare host: https


def test_reachable_endpoint_and_closed_endpoint(monkeypatch, live_port, closed_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{live_port}")
    assert hub.hub_reachable()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    assert not hub.hub_reachable()


def test_the_proxy_is_probed_not_the_endpoint(monkeypatch, live_port, closed_port):
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{closed_port}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{live_port}")
    assert hub.hub_reachable()
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{closed_port}")  # lowercase wins, as in urllib
    assert not hub.hub_reachable()


def test_no_proxy_probes_the_endpoint_directly(monkeypatch, live_port, closed_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{live_port}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")
    assert not hub.hub_reachable()  # through the dead proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert hub.hub_reachable()


def test_offline_variable_wins_without_probing(monkeypatch, live_port):
    def no_probe(*args):
        raise AssertionError("probed although offline")

    monkeypatch.setattr(hub, "_connects", no_probe)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{live_port}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.hub_reachable()


def test_malformed_endpoint_is_unreachable(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:notaport")
    assert not hub.hub_reachable()
