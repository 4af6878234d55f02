"""Every `agme` command through Typer's CliRunner: outputs, --json, --dry-run, and one line + exit code per error.

The model is the session's REAL backdoored ResNet (conftest ``backdoored``); Hub sources live on the test Hub
(``tests/hub_server.py``, 127.0.0.1) and the real huggingface_hub client talks to it. Clean runs use cheap options
(``--layers fc --lam 0.1 --per-class 5``) so each takes seconds.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agme_hub import errors
from agme_hub.hub.card import validate_card
from agme_hub.constants import AGME_MARKER, CARD_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME
from cli import app
from tests.conftest import TEST_TARGET
from tests.fixtures_hub import BAD_TOKEN, read_folder

SOURCE = "org/backdoored"
TARGET = "me/backdoored-agme"
TRIGGER = "badnets-white-br"
OUTPUT_FILES = {WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, REPORT_NAME}
CHEAP = ["--data", "fashion-mnist", "--per-class", "5", "--eval-per-class", "20", "--lam", "0.1", "--layers", "fc",
         "--augment-copies", "1", "--trigger", TRIGGER, "--target", str(TEST_TARGET)]
METRIC_KEYS = {"clean_accuracy", "attack_success_rate", "target_accuracy", "robust_accuracy"}

runner = CliRunner()


def agme(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output


def one_line_error(result, code: int) -> str:
    """The run failed with ``code``, one ``error:`` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, repr(result.exception))
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()  # also splits on "\r": a progress bar would show up here
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def parse_json(result) -> dict:
    ok(result)
    record = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert isinstance(record, dict)
    return record


# fixtures: a real backdoored model, locally and on the test Hub, and small data files
@pytest.fixture(scope="module")
def model_dir(backdoored) -> Path:
    return backdoored(TRIGGER).out_dir


@pytest.fixture
def source_sha(hub_env, model_dir) -> str:
    card = b"---\nlicense: mit\nlibrary_name: timm\n---\n# A backdoored ResNet\n"
    return hub_env.server.commit(SOURCE, {**read_folder(model_dir), CARD_NAME: card})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """fmnist.npz (300 Fashion-MNIST test images), rgba.npz (4 channels), twelve.npz (12 classes)."""
    from agme_hub.data import balanced_indices, load_images

    folder = tmp_path_factory.mktemp("data")
    data = load_images("fashion-mnist")
    keep = balanced_indices(data.labels, 30, seed=5)
    x, y = data.images[keep], data.labels[keep]
    np.savez(folder / "fmnist.npz", x=x, y=y)
    np.savez(folder / "rgba.npz", x=np.repeat(x, 4, axis=-1), y=y)
    np.savez(folder / "twelve.npz", x=x, y=np.arange(len(y)) % 12)
    return folder


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_backdoor_removed(record: dict) -> None:
    before, after = record["before"], record["after"]
    assert set(before) == set(after) == METRIC_KEYS
    assert all(value is None or 0.0 <= value <= 1.0 for value in (*before.values(), *after.values()))
    assert before["attack_success_rate"] > 0.8
    assert after["attack_success_rate"] < before["attack_success_rate"] - 0.5
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.1


# clean
def test_clean_local_folder(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / f"{model_dir.name}-agme"  # the default output folder: ./<name>-agme

    result = agme("clean", model_dir, *CHEAP)

    ok(result)
    assert result.stdout == ""  # the human rendering goes to stderr
    for text in ("attack success rate", "clean accuracy", "edited fc with lam=0.1", f"output: {out}"):
        assert text in result.stderr, text
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["source_kind"] == "local" and report["revision"] is None and report["push"] is None
    assert_backdoor_removed(report)


def test_clean_hub_id_json(hub_env, source_sha, tmp_path):
    out = tmp_path / "out"

    record = parse_json(agme("clean", f"hf-hub:{SOURCE}", *CHEAP, "--out", out, "--push-to", TARGET, "--json"))

    assert (record["source"], record["revision"], record["mode"]) == (f"hf-hub:{SOURCE}", source_sha, "bdk")
    assert record["target"]["index"] == TEST_TARGET and record["n_edit_images"] == 50
    assert record["method"]["lam"] == 0.1 and record["method"]["gamma"] == 1.0 and record["method"]["layers"] == ["fc"]
    assert {"load", "capture", "edit", "repair", "eval", "save"} <= set(record["timing"])
    assert record["method"]["refitted"] == ""  # the edit was the classifier's own: nothing to re-fit
    assert record["runtime"]["device"] == "cpu" and record["runtime"]["batch_size"] > 0  # where it ran, not "auto"
    assert record["output_dir"] == str(out)
    assert_backdoor_removed(record)
    push = record["push"]
    assert push["repo_id"] == TARGET and push["commit_sha"] == hub_env.server.head(TARGET) and not push["skipped"]
    assert json.loads((out / REPORT_NAME).read_text()) == record


def test_dry_run_writes_nothing_and_pushes_nothing(hub_env, source_sha, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"

    record = parse_json(agme("clean", SOURCE, *CHEAP, "--out", out, "--push-to", TARGET, "--dry-run", "--json"))

    assert record["status"] == "dry-run" and record["revision"] == source_sha
    assert record["candidate_layers"] == {"given": ["fc"]}
    assert set(record["files"]) == OUTPUT_FILES and record["push"] == {"repo_id": TARGET, "create_pr": False}
    assert WEIGHTS_NAME in record["source_files"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf_home"]
    server = hub_env.server
    assert server.commit_count == 0 and TARGET not in server.repos
    assert not [r for r in server.requests if r.method == "POST"]
    assert not list(hub_env.cache_dir.rglob(WEIGHTS_NAME)), "a dry run downloads no weights"

    human = agme("clean", SOURCE, "--data", "fashion-mnist", "--create-pr", "--push-to", TARGET, "--dry-run")
    ok(human)
    assert "candidate layers" in human.stderr and "would write to" in human.stderr
    assert f"would push to {TARGET} as a pull request" in human.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_home"] and server.commit_count == 0


def test_dry_run_without_trigger_lists_candidate_layers_and_surrogate_files(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    record = parse_json(agme("clean", model_dir, "--data", "fashion-mnist", "--dry-run", "--json"))

    assert (record["status"], record["mode"], record["revision"], record["source_kind"]) == (
        "dry-run", "no-bdk", None, "local")
    assert record["output_dir"] == str(tmp_path / f"{model_dir.name}-agme") and record["push"] is None
    assert "surrogate_trigger/surrogate_pattern.png" in record["files"]
    assert record["candidate_layers"] and all(record["candidate_layers"].values())
    assert list(tmp_path.iterdir()) == []


# inspect, eval
def test_inspect(hub_env, source_sha, model_dir):
    info = parse_json(agme("inspect", SOURCE, "--json"))

    assert (info["format"], info["architecture"], info["repo_id"]) == ("timm", "resnet10t", SOURCE)
    assert (info["revision"], info["num_classes"], info["license"]) == (source_sha, 10, "mit")
    assert info["label_names"][TEST_TARGET] == "Trouser" and info["input_size"] == [1, 32, 32]
    assert WEIGHTS_NAME in info["files"] and "fc" in json.dumps(info["candidate_layers"])

    human = agme("inspect", model_dir)
    ok(human)
    assert "resnet10t" in human.stderr and "Trouser" in human.stderr and human.stdout == ""

    # A timm pretrained name resolves to the Hub repo timm keeps its weights in.
    sha = hub_env.server.commit("timm/resnet10t.c3_in1k", read_folder(model_dir))
    by_name = parse_json(agme("inspect", "resnet10t.c3_in1k", "--json"))
    assert (by_name["repo_id"], by_name["revision"]) == ("timm/resnet10t.c3_in1k", sha)


def test_eval(hub_env, source_sha, model_dir, data_dir):
    npz = data_dir / "fmnist.npz"

    record = parse_json(agme("eval", f"{SOURCE}@{source_sha}", "--data", npz, "--trigger", TRIGGER,
                             "--target", "Trouser", "--json"))

    assert record["revision"] == source_sha and record["target"] == TEST_TARGET
    metrics = record["metrics"]
    assert metrics["n_images"] == 300 and metrics["attack_success_rate"] > 0.8 and metrics["clean_accuracy"] > 0.6
    local = parse_json(agme("eval", model_dir, "--data", npz, "--trigger", TRIGGER, "--target", "1", "--json"))
    assert local["metrics"] == metrics

    human = agme("eval", model_dir, "--data", npz)  # no trigger: attack success is not measured
    ok(human)
    assert "clean accuracy" in human.stderr and "not measured" in human.stderr


# push, card
def test_push_command_pr_then_commit_then_nothing(hub_env, model_dir, tmp_path):
    out = tmp_path / "out"
    ok(agme("clean", model_dir, *CHEAP, "--out", out))
    server = hub_env.server

    as_pr = parse_json(agme("push", out, TARGET, "--create-pr", "--private", "--json"))
    assert as_pr["pr_url"].endswith(f"/{TARGET}/discussions/1") and set(server.files(TARGET)) == {".gitattributes"}
    assert server.repos[TARGET].private

    committed = agme("push", out, TARGET)
    ok(committed)
    assert "/commit/" in committed.stderr and set(server.files(TARGET)) == OUTPUT_FILES | {".gitattributes"}

    again = parse_json(agme("push", out, TARGET, "--json"))
    assert again["skipped"] and "no commit" in again["reason"] and server.commit_count == 2


def test_card_rerenders_a_deleted_readme(model_dir, tmp_path):
    out = tmp_path / "out"
    ok(agme("clean", model_dir, *CHEAP, "--out", out))
    original = (out / CARD_NAME).read_text()
    (out / CARD_NAME).unlink()

    result = agme("card", out)

    ok(result)
    assert "valid" in result.stderr
    card = (out / CARD_NAME).read_text()
    assert card == original and AGME_MARKER in card
    validate_card(card)
    # Someone else's README is not replaced by `agme card`.
    (out / CARD_NAME).write_text("# my notes\n")
    one_line_error(agme("card", out), errors.OutputExistsError.exit_code)
    assert (out / CARD_NAME).read_text() == "# my notes\n"


# errors: one line, a distinct exit code, never a traceback
def test_exit_codes_are_distinct():
    classes = [getattr(errors, name) for name in errors.__all__]
    assert len({cls.exit_code for cls in classes}) == len(classes)
    assert all(cls.exit_code not in (0, 1, 130) for cls in classes if cls is not errors.AgmeError)


ERROR_CASES = {
    "usage: no --data": errors.UsageError,
    "usage: --create-pr without --push-to": errors.UsageError,
    "data not found": errors.DataError,
    "bad trigger spec": errors.TriggerSpecError,
    "unknown trigger kind": errors.TriggerSpecError,
    "shape mismatch: 4-channel images": errors.ShapeMismatchError,
    "class mismatch: 12-class data": errors.ClassMismatchError,
    "class mismatch: --target out of range": errors.ClassMismatchError,
    "unsupported format: local transformers folder": errors.UnsupportedFormatError,
    "unsupported format: transformers repo": errors.UnsupportedFormatError,
    "pickle refused": errors.PickleRefusedError,
    "layer not found": errors.LayerNotFoundError,
    "repo not found": errors.RepoNotFoundError,
    "local folder not found": errors.RepoNotFoundError,
    "gated": errors.GatedRepoError,
    "unauthorized": errors.UnauthorizedError,
    "revision not found": errors.RevisionNotFoundError,
    "revision not found (--revision)": errors.RevisionNotFoundError,
    "offline, nothing cached": errors.OfflineCacheMissError,
    "offline by HF_HUB_OFFLINE, nothing cached": errors.OfflineCacheMissError,
    "network failure": errors.NetworkError,
    "push of an incomplete folder": errors.PushError,
    "output folder with user files": errors.OutputExistsError,
    "card of a folder without report": errors.UsageError,
    "device: clean --device cuda without CUDA": errors.DeviceError,
    "device: eval --device cuda:1 without CUDA": errors.DeviceError,
    "device: demo --device cuda without CUDA": errors.DeviceError,
    "device: backdoor-train --device cuda without CUDA": errors.DeviceError,
    "device: scan --device cuda without CUDA": errors.DeviceError,
    "device: unknown spec": errors.DeviceError,
}


def _transformers_folder(root: Path, model_dir: Path) -> Path:
    root.mkdir()
    (root / CONFIG_NAME).write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (root / WEIGHTS_NAME).write_bytes((model_dir / WEIGHTS_NAME).read_bytes())
    return root


def _pickle_folder(root: Path, model_dir: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    root.mkdir()
    (root / CONFIG_NAME).write_text((model_dir / CONFIG_NAME).read_text())
    torch.save(load_file(model_dir / WEIGHTS_NAME), root / "pytorch_model.bin")
    return root


def _error_args(case: str, *, hub_env, model_dir: Path, data: Path, tmp: Path, monkeypatch) -> list[object]:
    from huggingface_hub import constants

    npz = data / "fmnist.npz"
    server = hub_env.server
    if case == "usage: no --data":
        return ["clean", model_dir, "--json"]
    if case == "usage: --create-pr without --push-to":
        return ["clean", model_dir, "--data", npz, "--create-pr", "--json"]
    if case == "data not found":
        return ["eval", model_dir, "--data", tmp / "no-such-images", "--json"]
    if case == "bad trigger spec":
        return ["clean", model_dir, "--data", npz, "--trigger", "patch:size=banana", "--target", "1", "--json"]
    if case == "unknown trigger kind":
        return ["eval", model_dir, "--data", npz, "--trigger", "sparkles", "--json"]
    if case == "shape mismatch: 4-channel images":
        return ["eval", model_dir, "--data", data / "rgba.npz", "--json"]
    if case == "class mismatch: 12-class data":
        return ["clean", model_dir, "--data", data / "twelve.npz", "--out", tmp / "out", "--json"]
    if case == "class mismatch: --target out of range":
        return ["clean", model_dir, *CHEAP, "--target", "10", "--out", tmp / "out", "--json"]
    if case == "unsupported format: local transformers folder":
        return ["inspect", _transformers_folder(tmp / "bert", model_dir), "--json"]
    if case == "unsupported format: transformers repo":
        server.commit("org/bert", read_folder(_transformers_folder(tmp / "bert", model_dir)))
        return ["clean", "org/bert", "--data", npz, "--out", tmp / "out", "--json"]
    if case == "pickle refused":
        return ["clean", _pickle_folder(tmp / "pickled", model_dir), *CHEAP, "--out", tmp / "out", "--json"]
    if case == "layer not found":
        return ["clean", model_dir, *CHEAP, "--layers", "no.such.layer", "--out", tmp / "out", "--json"]
    if case == "repo not found":
        return ["inspect", "org/missing", "--json"]
    if case == "local folder not found":
        return ["inspect", f"local-dir:{tmp / 'missing'}", "--json"]
    if case == "gated":
        server.gate("org/gated", allowed_tokens={"hf_friend"})
        server.commit("org/gated", read_folder(model_dir))
        return ["clean", "org/gated", *CHEAP, "--out", tmp / "out", "--json"]
    if case == "unauthorized":
        return ["inspect", SOURCE, "--token", BAD_TOKEN, "--json"]
    if case == "revision not found":
        return ["eval", f"{SOURCE}@no-such-branch", "--data", npz, "--json"]
    if case == "revision not found (--revision)":
        return ["clean", SOURCE, *CHEAP, "--revision", "v9", "--out", tmp / "out", "--json"]
    if case == "offline, nothing cached":
        return ["clean", SOURCE, *CHEAP, "--offline", "--out", tmp / "out", "--json"]
    if case == "offline by HF_HUB_OFFLINE, nothing cached":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub parses it at import
        return ["inspect", SOURCE, "--json"]
    if case == "network failure":
        url = closed_port_url()
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        return ["clean", SOURCE, *CHEAP, "--out", tmp / "out", "--json"]
    if case == "push of an incomplete folder":
        (tmp / "half").mkdir()
        (tmp / "half" / CONFIG_NAME).write_text((model_dir / CONFIG_NAME).read_text())
        return ["push", tmp / "half", TARGET, "--json"]
    if case == "output folder with user files":
        (tmp / "out").mkdir()
        (tmp / "out" / "thesis.tex").write_text("years of work")
        return ["clean", model_dir, *CHEAP, "--out", tmp / "out", "--json"]
    if case == "card of a folder without report":
        return ["card", model_dir]
    if case.startswith("device:"):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
        monkeypatch.setattr("agme_hub.lab.backdoor.train_backdoored", _no_training)
    if case == "device: clean --device cuda without CUDA":
        return ["clean", SOURCE, *CHEAP, "--device", "cuda", "--out", tmp / "out", "--json"]
    if case == "device: eval --device cuda:1 without CUDA":
        return ["eval", model_dir, "--data", npz, "--device", "cuda:1", "--json"]
    if case == "device: demo --device cuda without CUDA":
        monkeypatch.setattr("agme_hub.lab.demo.demo_model_dir", _no_training)
        return ["demo", "--out", tmp / "out", "--device", "cuda", "--json"]
    if case == "device: backdoor-train --device cuda without CUDA":
        return ["backdoor-train", "--out", tmp / "out", "--device", "cuda", "--json"]
    if case == "device: scan --device cuda without CUDA":
        return ["scan", model_dir, "--data", npz, "--device", "cuda", "--report", tmp / "out", "--json"]
    if case == "device: unknown spec":
        return ["clean", model_dir, *CHEAP, "--device", "tpu", "--out", tmp / "out", "--json"]
    raise AssertionError(case)


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("a missing device must fail before any training")


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_error_is_one_line_and_its_exit_code(case, hub_env, source_sha, model_dir, data_dir, tmp_path,
                                                  monkeypatch):
    expected = ERROR_CASES[case]
    args = _error_args(case, hub_env=hub_env, model_dir=model_dir, data=data_dir, tmp=tmp_path,
                       monkeypatch=monkeypatch)

    line = one_line_error(agme(*args), expected.exit_code)

    assert BAD_TOKEN not in line and hub_env.token not in line
    assert hub_env.server.commit_count == 0
    if case == "output folder with user files":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["thesis.tex"] and "--yes" in line
    else:
        assert not (tmp_path / "out").exists(), "a failed run must not leave an output folder"
    if case.startswith("offline") or case.startswith("device:"):
        assert not [r for r in hub_env.server.requests if SOURCE in r.path], "nothing may ask the Hub"
    if case == "pickle refused":
        assert "--allow-pickle" in line


def test_allow_pickle_loads_pickle_weights(hub_env, model_dir, data_dir, tmp_path):
    folder = _pickle_folder(tmp_path / "pickled", model_dir)
    npz = data_dir / "fmnist.npz"

    pickled = parse_json(agme("eval", folder, "--data", npz, "--allow-pickle", "--json"))
    safe = parse_json(agme("eval", model_dir, "--data", npz, "--json"))

    assert pickled["metrics"] == safe["metrics"]


def test_output_folder_with_user_files_is_replaced_with_yes(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("replace me")

    ok(agme("clean", model_dir, *CHEAP, "--out", out, "--yes"))

    assert {p.name for p in out.iterdir()} == OUTPUT_FILES


# secrets and interruptions
def test_token_never_appears_anywhere(hub_env, source_sha, tmp_path, caplog):
    secret = "hf_cli_secret_must_never_be_printed_0042"
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG)

    as_json = agme("clean", SOURCE, *CHEAP, "--out", out, "--push-to", TARGET, "--token", secret, "--json")
    human = agme("clean", SOURCE, *CHEAP, "--out", out, "--push-to", TARGET, "--token", secret, "-v")
    dry = agme("clean", SOURCE, *CHEAP, "--push-to", TARGET, "--token", secret, "--dry-run", "--json")
    inspected = agme("inspect", SOURCE, "--token", secret, "--json")
    pushed = agme("push", out, TARGET, "--token", secret, "--json")

    for result in (as_json, human, dry, inspected, pushed):
        ok(result)
        assert secret not in result.stdout and secret not in result.stderr
    assert parse_json(as_json)["push"]["commit_sha"] == hub_env.server.head(TARGET)
    assert secret not in caplog.text
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for name, content in hub_env.server.files(TARGET).items():
        assert secret.encode() not in content, name


def test_unexpected_error_is_one_line_exit_1_without_the_token(hub_env, source_sha, monkeypatch):
    from huggingface_hub import HfApi

    secret = "hf_cli_secret_quoted_by_a_library_0042"

    def leaky(self, *args, **kwargs):
        raise RuntimeError(f"unexpected answer for Authorization: Bearer {secret}\nsecond line")

    monkeypatch.setattr(HfApi, "model_info", leaky)

    line = one_line_error(agme("inspect", SOURCE, "--token", secret, "--json"), 1)

    assert line.startswith("error: RuntimeError: unexpected answer") and "AGME_DEBUG=1" in line
    assert secret not in line and "***" in line


def test_failure_in_the_middle_of_the_save_leaves_no_output_folder(model_dir, tmp_path, monkeypatch):
    import agme_hub.app.clean as pipeline

    out = tmp_path / "out"

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "write_card", broken_card)
        line = one_line_error(agme("clean", model_dir, *CHEAP, "--out", out), 1)
    assert "disk full" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no output folder and no temporary folder left"

    # A second run succeeds; an interrupt (Ctrl-C) in the middle of the next save leaves that folder as it was.
    ok(agme("clean", model_dir, *CHEAP, "--out", out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_keep_config", interrupted)
        line = one_line_error(agme("clean", model_dir, *CHEAP, "--out", out, "--per-class", "6"), 130)
    assert "interrupted" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_push_leaves_no_remote_commit(hub_env, source_sha, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_commit", interrupted)
        one_line_error(agme("clean", SOURCE, *CHEAP, "--out", out, "--push-to", TARGET, "--json"), 130)

    assert hub_env.server.commit_count == 0 and set(hub_env.server.files(TARGET)) == {".gitattributes"}
    assert parse_json(agme("push", out, TARGET, "--json"))["commit_sha"] == hub_env.server.head(TARGET)


# demo
def test_demo_trains_cleans_and_writes_a_valid_card(tmp_path, monkeypatch):
    import agme_hub.app.clean as pipeline
    import agme_hub.lab.demo as demo_module
    from agme_hub.data import balanced_indices

    monkeypatch.setenv("AGME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_module, "DEMO_BACKDOOR", {**demo_module.DEMO_BACKDOOR, "n_train": 40, "n_test": 10,
                                                       "epochs": 1})
    real_load_images = pipeline.load_images

    def fewer_images(spec, **kwargs):  # evaluate on 40 images per class instead of all 10,000
        data = real_load_images(spec, **kwargs)
        return data.subset(balanced_indices(data.labels, 40, seed=0))

    monkeypatch.setattr(pipeline, "load_images", fewer_images)
    out = tmp_path / "demo-out"

    record = parse_json(agme("demo", "--out", out, "--per-class", "5", "--json"))

    assert record["status"] == "complete" and record["mode"] == "bdk" and record["output_dir"] == str(out)
    assert record["n_edit_images"] == 50 and set(record["before"]) == METRIC_KEYS
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    card = (out / CARD_NAME).read_text()
    assert AGME_MARKER in card
    validate_card(card)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / WEIGHTS_NAME).is_file()

    # A second demo reuses the cached model (training again would fail here) and renders for humans.
    def no_training(*args, **kwargs):
        raise AssertionError("the demo model should come from the cache")

    monkeypatch.setattr("agme_hub.lab.backdoor.train_backdoored", no_training)
    again = agme("demo", "--out", out, "--per-class", "5")
    ok(again)
    # rich wraps at the console's width: a long temporary path (pytest-xdist's) may start a line of its own
    assert "attack success rate" in again.stderr and f"output: {out}" in " ".join(again.stderr.split())
