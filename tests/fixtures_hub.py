"""Pytest plugin: a Hub-compatible server per test and a huggingface_hub pointed at it.

Enable with ``pytest_plugins = ["tests.fixtures_hub"]`` in tests/conftest.py, then:

    def test_pull(hub_env, timm_folder_factory):
        folder, model = timm_folder_factory("m1")
        hub_env.server.commit("org/tiny", read_folder(folder))
        resolve_source("org/tiny")  # talks to hub_env.url, caches under hub_env.cache_dir

``hub_env`` redirects every huggingface_hub call made without an explicit endpoint (timm's included) to the
server, gives each test its own empty HF_HOME, disables Xet (the server speaks plain commits only) and sets
``HF_TOKEN`` to a fake token so a developer's real token can never be sent anywhere.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hub_server import HubServer

__all__ = [
    "GOOD_TOKEN", "BAD_TOKEN", "HubEnv", "forward_once", "read_folder", "hub_server", "hub_env", "timm_folder_factory",
]

GOOD_TOKEN = "hf_agme_test_token"
BAD_TOKEN = "hf_agme_revoked_token"  # the server answers 401 to this one
_LOOPBACK = {"127.0.0.1", "localhost", "::1", b"127.0.0.1", b"localhost"}


@dataclass(frozen=True)
class HubEnv:
    """The server plus where huggingface_hub now keeps its state."""

    server: HubServer
    url: str
    hf_home: Path
    cache_dir: Path
    token: str = GOOD_TOKEN


def forward_once(model: Any) -> Any:
    """Logits of ``model`` on a fixed random batch, computed on one CPU thread.

    One thread because these tiny models run hundreds of times slower when torch's threads compete with
    other processes for a few cores.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return model.eval()(torch.randn(2, 3, 32, 32, generator=generator))
    finally:
        torch.set_num_threads(threads)


def read_folder(folder: Path) -> dict[str, bytes]:
    """The files of a folder as ``{relative path: bytes}``, ready for ``HubServer.commit``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A started HubServer (127.0.0.1, random port) that knows ``BAD_TOKEN``; stopped at teardown."""
    with HubServer(bad_tokens={BAD_TOKEN}) as server:
        yield server


@pytest.fixture
def hub_env(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubEnv:
    """Point huggingface_hub at ``hub_server`` with a private, empty cache for this test."""
    from huggingface_hub import constants

    url = hub_server.url
    hf_home = tmp_path / "hf_home"
    cache_dir = hf_home / "hub"
    cache_dir.mkdir(parents=True)
    env = {
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(cache_dir), "HF_ENDPOINT": url, "HF_TOKEN": GOOD_TOKEN,
        "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads its environment once, at import (during collection): patch the parsed constants.
    patched = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache_dir),
        "HUGGINGFACE_HUB_CACHE": str(cache_dir),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
    }
    for name, value in patched.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # Older releases (0.36) also copy some constants into other modules at import (file_download's URL template).
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("huggingface_hub.") and module is not constants:
            for name in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
                if isinstance(getattr(module, name, None), str):
                    monkeypatch.setattr(module, name, patched[name])
    _allow_loopback_only(monkeypatch)
    return HubEnv(server=hub_server, url=url, hf_home=hf_home, cache_dir=cache_dir)


def _allow_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail fast (no DNS, no retries) if anything tries to reach a host other than this machine."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in _LOOPBACK:
            raise socket.gaierror(socket.EAI_NONAME, f"tests may only reach 127.0.0.1, not {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def timm_folder_factory(tmp_path: Path) -> Callable[..., tuple[Path, object]]:
    """Build a tiny timm model with random weights and save it as a timm folder (no downloads).

    Returns ``make(name, *, seed=0, num_classes=3) -> (folder, model)``.
    """
    import timm
    import torch

    from agme_hub.hub.checkpoint import save_model

    def make(name: str, *, seed: int = 0, num_classes: int = 3) -> tuple[Path, object]:
        torch.manual_seed(seed)
        model = timm.create_model("test_resnet", num_classes=num_classes).eval()
        folder = save_model(model, tmp_path / "models" / name, label_names=[f"c{i}" for i in range(num_classes)])
        return folder, model

    return make
