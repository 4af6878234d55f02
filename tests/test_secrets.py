"""No Hub token reaches stdout, stderr, job logs, summaries, reports or cards (red-team defects 3, 4).

The server here quotes the request's Authorization header back in its error message, as some proxies and
misconfigured mirrors do. Each test first checks the server really received the token (so the test can fail),
then that the token appears nowhere agme wrote. The token comes from ``--token``, ``HF_TOKEN``, the file that
``hf auth login`` saves under HF_HOME, or a batch jobs file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agme_hub import errors
from tests.helpers import save_tiny_model, write_three_class_npz
from cli import app
from tests.fixtures_hub import read_folder
from tests.misbehaving_servers import EchoAuthServer, point_hub_at

SECRET = "hf_SeCrEtT0kenThatMustNeverBePrinted"
runner = CliRunner()
CHEAP = ["--per-class", "5", "--lam", "0.1", "--layers", "fc", "--augment-copies", "1",
         "--trigger", "badnets-white-br", "--target", "0"]


def agme(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def files_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> Path:
    return write_three_class_npz(tmp_path_factory.mktemp("data") / "d3.npz", per_class=20)


def use_token(how: str, hub_env, monkeypatch) -> list[str]:
    """Make SECRET the token agme uses, the way ``how`` says; returns the extra CLI flags."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if how == "flag":
        return ["--token", SECRET]
    if how == "env":
        monkeypatch.setenv("HF_TOKEN", SECRET)
    else:  # saved by `hf auth login`
        (hub_env.hf_home / "token").write_text(SECRET)
    return []


@pytest.mark.parametrize("how", ["flag", "env", "saved"])
@pytest.mark.parametrize("command", ["inspect", "eval", "clean", "push"])
def test_a_quoted_authorization_header_is_scrubbed(hub_env, monkeypatch, tiny_model, data3, tmp_path, how,
                                                   command):
    flags = use_token(how, hub_env, monkeypatch)
    folder = shutil.copytree(tiny_model, tmp_path / "folder")
    args = {"inspect": ["inspect", "org/x"], "eval": ["eval", "org/x", "--data", data3],
            "clean": ["clean", "org/x", "--data", data3, *CHEAP, "--out", tmp_path / "out"],
            "push": ["push", folder, "me/x"]}[command]
    with EchoAuthServer(500) as url:
        point_hub_at(monkeypatch, url)
        result = agme(*args, *flags)
    expected = errors.PushError.exit_code if command == "push" else errors.NetworkError.exit_code
    assert result.exit_code == expected, result.output
    assert "HTTP 500" in result.stderr and "***" in result.stderr, "the server's message (with the header) is shown"
    assert SECRET not in result.output and SECRET not in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_server_really_received_each_token(hub_env, monkeypatch):
    """The precondition of the test above: each way of giving the token does send it."""
    for how in ("flag", "env", "saved"):
        flags = use_token(how, hub_env, monkeypatch)
        server = EchoAuthServer(500)
        with server as url:
            point_hub_at(monkeypatch, url)
            agme("inspect", "org/x", *flags)
        assert f"Bearer {SECRET}" in server.seen, how
        (hub_env.hf_home / "token").unlink(missing_ok=True)


def test_batch_logs_and_summary_hold_no_token(hub_env, monkeypatch, data3, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"defaults": {"data": str(data3), "token": SECRET, "trigger": "badnets-white-br",
                                             "target": "0"},
                                "jobs": [{"source": "org/x", "name": "one"}]}))
    server = EchoAuthServer(500)
    with server as url:
        point_hub_at(monkeypatch, url)
        result = agme("batch", jobs, "--out-root", tmp_path / "root")
    assert f"Bearer {SECRET}" in server.seen
    assert result.exit_code == errors.BatchFailedError.exit_code, result.output
    log = (tmp_path / "root" / "one" / "job.log").read_text()
    assert "Traceback" in log and "***" in log, "the traceback is kept, with the token scrubbed"
    assert SECRET not in files_text(tmp_path / "root")
    assert SECRET not in result.output


@pytest.mark.parametrize("how", ["flag", "env", "saved"])
def test_reports_and_cards_hold_no_token(hub_env, monkeypatch, tiny_model, data3, tmp_path, how):
    flags = use_token(how, hub_env, monkeypatch)
    hub_env.server.commit("org/tiny", read_folder(tiny_model))
    out = tmp_path / "out"
    result = agme("clean", "org/tiny", "--data", data3, *CHEAP, "--out", out, "--push-to", "me/tiny-agme",
                  "--json", *flags)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output and SECRET not in files_text(out)
    assert SECRET not in "\n".join(v.decode("utf-8", "replace") for v in hub_env.server.files("me/tiny-agme").values())


def test_a_malformed_jobs_file_token_is_not_echoed(tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [{"source": "org/x", "data": "fashion-mnist", "token": [SECRET]}]}))
    result = agme("batch", jobs, "--out-root", tmp_path / "root")
    assert result.exit_code in (errors.JobsFileError.exit_code, errors.UsageError.exit_code), result.output
    assert "token" in result.stderr and SECRET not in result.output
