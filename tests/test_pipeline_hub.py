"""The whole product path against the test Hub: pull a REAL backdoored model, clean it, push it, load it back.

Every test runs the real huggingface_hub client (and timm) against ``tests/hub_server.py`` on 127.0.0.1. The
model is the session's backdoored ResNet (conftest ``backdoored``); the clean options are cheap (the ``fc``
layer, a fixed ridge, 5 images per class) so that one clean takes seconds, yet the attack really stops working.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import agme_hub
from agme_hub import errors
from agme_hub.hub.card import validate_card
from agme_hub.hub.checkpoint import load_model
from agme_hub.constants import AGME_MARKER, CARD_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME
from agme_hub.options import CleanOptions
from agme_hub.app import clean as app_clean
from tests.conftest import TEST_TARGET
from tests.fixtures_hub import read_folder

SOURCE = "org/backdoored"
TARGET = "me/backdoored-agme"
TRIGGER = "badnets-white-br"
SOURCE_CARD = b"---\nlicense: mit\nlibrary_name: timm\n---\n# A backdoored ResNet\n"
OUTPUT_FILES = {WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, REPORT_NAME}
# Cheap but real: edit only the classifier with a fixed ridge, 5 clean images per class, 200 held-out images.
CHEAP = dict(data="fashion-mnist", per_class=5, eval_per_class=20, lam=0.1, layers=("fc",), augment_copies=1,
             trigger=TRIGGER, target=str(TEST_TARGET))


# The API returns typed results; these tests read them as the JSON a user's script would get from --json.
def run_clean(source, options):
    return app_clean.run_clean(source, options).to_json()


def push_output(folder, repo_id, **kwargs):
    return app_clean.push_output(folder, repo_id, **kwargs).to_json()


def evaluate_source(source, **kwargs):
    return app_clean.evaluate_source(source, **kwargs).to_json()


def cheap(out: Path, **overrides) -> CleanOptions:
    return CleanOptions(**{**CHEAP, "out": str(out), **overrides})


def logits(model: torch.nn.Module) -> torch.Tensor:
    """Outputs on a fixed random batch of 1-channel 32x32 images (the test models are Fashion-MNIST models)."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 1, 32, 32, generator=generator))


def assert_backdoor_removed(record: dict) -> None:
    before, after = record["before"], record["after"]
    assert before["attack_success_rate"] > 0.8, before
    assert after["attack_success_rate"] < before["attack_success_rate"] - 0.5, (before, after)
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.1, (before, after)


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})


@pytest.fixture(scope="module")
def model_dir(backdoored) -> Path:
    """The folder of a real backdoored model (timm format), trained once per run."""
    return backdoored(TRIGGER).out_dir


@pytest.fixture
def source_sha(hub_env, model_dir) -> str:
    """SOURCE on the test Hub holds the backdoored model and an author's card; returns its commit sha."""
    return hub_env.server.commit(SOURCE, {**read_folder(model_dir), CARD_NAME: SOURCE_CARD})


def test_clean_hub_model_push_and_timm_loads_the_cleaned_model_back(hub_env, source_sha, model_dir, tmp_path):
    import timm

    out = tmp_path / "out"

    record = run_clean(SOURCE, cheap(out, push_to=TARGET))

    assert (record["source"], record["source_kind"], record["revision"]) == (SOURCE, "hub", source_sha)
    assert (record["base_model"], record["license"], record["mode"]) == (SOURCE, "mit", "bdk")
    assert record["method"]["layers"] == ["fc"] and record["method"]["lam"] == 0.1
    assert record["target"]["index"] == TEST_TARGET and record["n_edit_images"] == 50
    assert_backdoor_removed(record)
    # Local output: the four files, the report as returned, a valid agme card naming the source.
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    report = json.loads((out / REPORT_NAME).read_text())
    assert report == json.loads(json.dumps(record))
    card = (out / CARD_NAME).read_text()
    assert AGME_MARKER in card and source_sha in card
    validate_card(card, base_model=SOURCE)
    # Provenance in the weights themselves.
    meta = safetensors_metadata(out / WEIGHTS_NAME)
    assert meta["agme.version"] == agme_hub.__version__
    assert meta["agme.source"] == f"{SOURCE}@{source_sha}"
    assert json.loads(meta["agme.method"])["layers"] == ["fc"]
    assert json.loads(meta["agme.parameters"]) == {"per_class": 5, "seed": 0, "target": str(TEST_TARGET),
                                                   "trigger": TRIGGER}
    # One commit on the Hub, holding exactly the output files.
    server = hub_env.server
    assert server.commit_count == 1
    remote = server.files(TARGET)
    assert set(remote) == OUTPUT_FILES | {".gitattributes"}
    for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
        assert remote[name] == (out / name).read_bytes(), name
    assert report["push"]["commit_sha"] == server.head(TARGET) and not report["push"]["skipped"]
    assert report["push"]["pr_url"] is None and record["push"] == report["push"]
    # timm loads the cleaned model back, from the Hub and from the folder, with the cleaned weights.
    cleaned = load_model(out)
    pushed = timm.create_model(f"hf-hub:{TARGET}", pretrained=True)
    local = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(logits(pushed), logits(cleaned), rtol=0, atol=0)
    torch.testing.assert_close(logits(local), logits(cleaned), rtol=0, atol=0)
    assert not torch.equal(logits(cleaned), logits(load_model(model_dir)))
    assert pushed.pretrained_cfg["label_names"][TEST_TARGET] == "Trouser"


def test_pinned_revision_cleans_the_old_weights(hub_env, source_sha, tmp_path, small_npz):
    server = hub_env.server
    first = run_clean(SOURCE, cheap(tmp_path / "first"))
    # A later commit on main replaces the weights with the cleaned ones; v1 keeps pointing at the backdoor.
    later = server.commit(SOURCE, {WEIGHTS_NAME: (tmp_path / "first" / WEIGHTS_NAME).read_bytes()})
    server.repos[SOURCE].refs["v1"] = source_sha

    pinned = run_clean(f"{SOURCE}@{source_sha}", cheap(tmp_path / "pinned"))
    latest = evaluate_source(SOURCE, data=str(small_npz), trigger=TRIGGER, target=TEST_TARGET)
    old = evaluate_source(f"hf-hub:{SOURCE}@v1", data=str(small_npz), trigger=TRIGGER, target=TEST_TARGET)

    assert first["revision"] == pinned["revision"] == old["revision"] == source_sha and latest["revision"] == later
    assert pinned["before"] == first["before"]  # the pinned run saw the backdoored weights, not main's
    assert latest["metrics"]["attack_success_rate"] < 0.3  # main now holds the cleaned weights
    assert old["metrics"]["attack_success_rate"] > 0.8  # v1 still holds the backdoor
    assert safetensors_metadata(tmp_path / "pinned" / WEIGHTS_NAME)["agme.source"] == f"{SOURCE}@{source_sha}"
    # --revision works like @rev; a dry run resolves it without downloading weights.
    dry = run_clean(SOURCE, cheap(tmp_path / "dry", revision="v1", dry_run=True))
    assert dry["revision"] == source_sha and not (tmp_path / "dry").exists()


def test_push_as_pull_request_leaves_main_alone(hub_env, source_sha, tmp_path):
    server = hub_env.server

    record = run_clean(SOURCE, cheap(tmp_path / "out", push_to=TARGET, create_pr=True))

    push = record["push"]
    assert push["pr_url"] is not None and push["pr_url"].endswith(f"/{TARGET}/discussions/1")
    assert set(server.files(TARGET, "main")) == {".gitattributes"}
    assert set(server.files(TARGET, "refs/pr/1")) == OUTPUT_FILES | {".gitattributes"}
    assert server.repos[TARGET].refs["refs/pr/1"] == push["commit_sha"] and server.commit_count == 1


def test_rerun_with_nothing_changed_makes_no_new_commit(hub_env, source_sha, tmp_path):
    server = hub_env.server
    out = tmp_path / "out"
    first = run_clean(SOURCE, cheap(out, push_to=TARGET))
    head = server.head(TARGET)

    again = run_clean(SOURCE, cheap(out, push_to=TARGET))
    by_hand = push_output(out, TARGET)  # `agme push` of the same folder afterwards

    assert not first["push"]["skipped"]
    assert again["push"]["skipped"] and by_hand["push"]["skipped"]
    assert again["push"]["commit_sha"] == head and server.head(TARGET) == head and server.commit_count == 1
    assert (out / WEIGHTS_NAME).read_bytes() == server.files(TARGET)[WEIGHTS_NAME]  # same bytes: a deterministic run
    # A real change (another seed) is pushed again.
    changed = run_clean(SOURCE, cheap(out, push_to=TARGET, per_class=6))
    assert not changed["push"]["skipped"] and server.commit_count == 2


def test_foreign_readme_on_the_target_is_not_overwritten(hub_env, source_sha, tmp_path):
    server = hub_env.server
    foreign = b"---\nlicense: mit\n---\n# My own card, written by hand\n"
    server.commit(TARGET, {CARD_NAME: foreign})

    record = run_clean(SOURCE, cheap(tmp_path / "out", push_to=TARGET))

    assert record["push"]["pr_url"] is not None and "not written by agme" in record["push"]["reason"]
    assert server.files(TARGET, "main")[CARD_NAME] == foreign
    assert AGME_MARKER.encode() in server.files(TARGET, "refs/pr/1")[CARD_NAME]


def test_offline_rerun_from_cache(hub_env, source_sha, tmp_path, monkeypatch):
    from huggingface_hub import constants

    online = run_clean(SOURCE, cheap(tmp_path / "online"))
    hub_env.server.stop()  # from here on, any request would fail

    offline = run_clean(SOURCE, cheap(tmp_path / "offline", offline=True))
    pinned = run_clean(f"{SOURCE}@{source_sha}", cheap(tmp_path / "pinned", offline=True, dry_run=True))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub parses the variable at import
    by_env = run_clean(SOURCE, cheap(tmp_path / "env"))

    assert offline["revision"] == pinned["revision"] == by_env["revision"] == online["revision"] == source_sha
    assert offline["before"] == online["before"] and offline["after"] == online["after"]
    assert (tmp_path / "offline" / WEIGHTS_NAME).read_bytes() == (tmp_path / "online" / WEIGHTS_NAME).read_bytes()
    assert (tmp_path / "env" / WEIGHTS_NAME).is_file()


def test_a_failed_push_leaves_no_remote_commit_and_a_complete_local_folder(hub_env, source_sha, tmp_path,
                                                                           monkeypatch):
    from huggingface_hub import HfApi

    def broken_commit(self, *args, **kwargs):
        raise ConnectionResetError("connection reset by peer while uploading")

    out = tmp_path / "out"
    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would also undo hub_env's patches
        patch.setattr(HfApi, "create_commit", broken_commit)
        with pytest.raises(errors.NetworkError):
            run_clean(SOURCE, cheap(out, push_to=TARGET))

    assert hub_env.server.commit_count == 0
    assert set(hub_env.server.files(TARGET)) == {".gitattributes"}
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES  # the local result is intact; `agme push` can retry
    assert not push_output(out, TARGET)["push"]["skipped"] and hub_env.server.commit_count == 1


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> Path:
    """300 Fashion-MNIST test images (30 per class) as an .npz: quick to evaluate."""
    import numpy as np

    from agme_hub.data import balanced_indices, load_images

    data = load_images("fashion-mnist")
    keep = balanced_indices(data.labels, 30, seed=5)
    path = tmp_path_factory.mktemp("data") / "fmnist-300.npz"
    np.savez(path, x=data.images[keep], y=data.labels[keep])
    return path
