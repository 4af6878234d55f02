"""Pull through a real self-hosted Hub mirror: olah (PyPI), offline, serving a local git repo (red-team defect 7).

olah answers ``/api/models/ORG/NAME/revision/REV`` but not the bare ``/api/models/ORG/NAME``; agme used to ask
the bare one and failed with "not found". The mirror runs on 127.0.0.1 in offline mode (it never contacts
huggingface.co); skipped when olah or git is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from tests.misbehaving_servers import point_hub_at

pytest.importorskip("olah")
if shutil.which("git") is None:
    pytest.skip("git is needed for olah's local mirrors", allow_module_level=True)

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _git(folder: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="module")
def olah_mirror(tmp_path_factory):
    """An olah server (offline) whose local mirror holds org/tiny as a git repo; yields (url, head sha)."""
    import timm

    from agme_hub.hub.checkpoint import save_model

    root = tmp_path_factory.mktemp("olah")
    repo = root / "mirrors" / "models" / "org" / "tiny"
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3, in_chans=1).eval()
    save_model(model, repo, label_names=["a", "b", "c"], pretrained_cfg={"input_size": (1, 32, 32)},
               model_args={"in_chans": 1})
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "tiny model")
    sha = _git(repo, "rev-parse", "HEAD")
    port = _free_port()
    (root / "olah.toml").write_text(f"""
[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{root / 'cache'}"
mirrors-path = ["{root / 'mirrors'}"]
hf-scheme = "http"
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"

[accessibility]
offline = true
""")
    log = open(root / "olah.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(root / "olah.toml")], cwd=root,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/models/org/tiny/revision/main", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"olah did not start: {(root / 'olah.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, sha
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_olah_needs_the_revision(hub_env, olah_mirror):
    """Why agme must send the revision: olah does not answer model_info without one."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    url, sha = olah_mirror
    api = HfApi(endpoint=url)
    assert api.model_info("org/tiny", revision="main").sha == sha
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/tiny")


def test_inspect_and_clean_through_olah(hub_env, olah_mirror, monkeypatch, tmp_path):
    from agme_hub.data import balanced_indices, load_images

    url, sha = olah_mirror
    point_hub_at(monkeypatch, url)
    data = load_images("fashion-mnist")
    keep = balanced_indices(data.labels, 20, seed=1)
    keep = keep[data.labels[keep] < 3]
    np.savez(tmp_path / "d3.npz", x=data.images[keep], y=data.labels[keep])

    inspected = runner.invoke(app, ["inspect", "org/tiny", "--json"])
    assert inspected.exit_code == 0, inspected.output
    cleaned = runner.invoke(app, ["clean", "org/tiny", "--data", str(tmp_path / "d3.npz"), "--per-class", "5",
                                  "--lam", "0.1", "--layers", "fc", "--augment-copies", "1", "--trigger",
                                  "badnets-white-br", "--target", "0", "--out", str(tmp_path / "out"), "--json"])
    assert cleaned.exit_code == 0, cleaned.output
    import json

    record = json.loads(cleaned.stdout)
    assert record["revision"] == sha and record["source_kind"] == "hub"
    assert (tmp_path / "out" / "model.safetensors").is_file()
