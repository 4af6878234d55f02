"""push_folder against a real huggingface_hub client talking to the test Hub server (tests/hub_server.py)."""

from __future__ import annotations

import json

import pytest
import torch

from agme_hub import errors
from agme_hub.constants import AGME_MARKER
from agme_hub.hub.push import PushResult, push_folder
from tests.fixtures_hub import BAD_TOKEN, GOOD_TOKEN, forward_once

REPO = "me/tiny-agme"
AGME_CARD = f"---\nlibrary_name: timm\nlicense: apache-2.0\n---\n{AGME_MARKER}\n# tiny, cleaned\n"


@pytest.fixture
def out_folder(timm_folder_factory):
    """An agme output folder: weights, config, an agme card, a report, plus a pickle that must never leave."""
    folder, model = timm_folder_factory("out", seed=7)
    (folder / "README.md").write_text(AGME_CARD)
    (folder / "agme_report.json").write_text(json.dumps({"status": "complete"}))
    (folder / "pytorch_model.bin").write_bytes(b"pickle that must not be pushed")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "state.lock").write_text("tool state")
    return folder, model


def _push(folder, hub_env, **kwargs) -> PushResult:
    return push_folder(folder, REPO, token=GOOD_TOKEN, endpoint=hub_env.url, **kwargs)


def _commit_posts(hub_env) -> list[str]:
    return [r.path for r in hub_env.server.requests if r.method == "POST" and "/commit/" in r.path]


def test_push_creates_repo_with_exactly_one_commit_and_no_pickle(hub_env, out_folder):
    folder, _ = out_folder

    result = _push(folder, hub_env)

    server = hub_env.server
    assert server.commit_count == 1 and len(_commit_posts(hub_env)) == 1
    remote = server.files(REPO)
    assert set(remote) == {".gitattributes", "model.safetensors", "config.json", "README.md", "agme_report.json"}
    assert remote["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert (result.skipped, result.pr_url, result.commit_sha) == (False, None, server.head(REPO))
    assert result.commit_url.endswith(f"/{REPO}/commit/{result.commit_sha}")
    assert result.repo_id == REPO and result.repo_url.endswith(f"/{REPO}")
    assert set(result.files) == set(remote) - {".gitattributes"}
    assert GOOD_TOKEN not in repr(result)
    assert all("agme/" in r.user_agent for r in server.requests if REPO in r.path)


def test_repush_without_changes_makes_no_commit_then_a_change_commits_only_that_file(hub_env, out_folder):
    folder, _ = out_folder
    first = _push(folder, hub_env)

    again = _push(folder, hub_env)
    assert again.skipped and again.commit_sha == first.commit_sha and again.commit_url is None
    assert hub_env.server.commit_count == 1 and "no commit" in again.reason

    (folder / "agme_report.json").write_text(json.dumps({"status": "complete", "run": 2}))
    third = _push(folder, hub_env)
    assert not third.skipped and third.files == ("agme_report.json",)
    assert hub_env.server.commit_count == 2
    assert json.loads(hub_env.server.files(REPO)["agme_report.json"])["run"] == 2


def test_push_as_pr_leaves_main_alone(hub_env, out_folder):
    folder, _ = out_folder

    result = _push(folder, hub_env, create_pr=True, commit_message="agme: cleaned weights")

    server = hub_env.server
    assert result.pr_url is not None and result.pr_url.endswith(f"/{REPO}/discussions/1")
    assert server.repos[REPO].refs["refs/pr/1"] == result.commit_sha
    assert set(server.files(REPO, "main")) == {".gitattributes"}
    assert "model.safetensors" in server.files(REPO, "refs/pr/1")
    assert server.repos[REPO].commits[result.commit_sha].message == "agme: cleaned weights"
    assert server.commit_count == 1


def test_foreign_readme_is_not_overwritten_push_goes_as_pr(hub_env, out_folder):
    folder, _ = out_folder
    foreign = b"---\nlicense: mit\n---\n# The author's own card\n"
    hub_env.server.commit(REPO, {"README.md": foreign})

    result = _push(folder, hub_env)

    assert result.pr_url is not None and "not written by agme" in result.reason
    assert hub_env.server.files(REPO, "main")["README.md"] == foreign
    assert hub_env.server.files(REPO, "refs/pr/1")["README.md"] == AGME_CARD.encode()


def test_agme_readme_on_the_hub_is_updated_in_place(hub_env, out_folder):
    folder, _ = out_folder
    hub_env.server.commit(REPO, {"README.md": AGME_CARD.replace("cleaned", "old run").encode()})

    result = _push(folder, hub_env)

    assert result.pr_url is None
    assert hub_env.server.files(REPO, "main")["README.md"] == AGME_CARD.encode()


def test_pushed_model_loads_back_with_timm(hub_env, out_folder):
    import timm

    folder, model = out_folder
    _push(folder, hub_env)

    loaded = timm.create_model(f"hf-hub:{REPO}", pretrained=True)

    torch.testing.assert_close(forward_once(loaded), forward_once(model), rtol=0, atol=0)


def test_push_with_a_given_client(hub_env, out_folder):
    from huggingface_hub import HfApi

    folder, _ = out_folder
    api = HfApi(endpoint=hub_env.url, token=GOOD_TOKEN, library_name="agme-test")

    result = push_folder(folder, REPO, api=api)

    assert not result.skipped and hub_env.server.commit_count == 1
    assert all("agme-test/" in r.user_agent for r in hub_env.server.requests if REPO in r.path)


def test_bad_token_is_unauthorized_and_never_echoed(hub_env, out_folder):
    folder, _ = out_folder
    with pytest.raises(errors.UnauthorizedError) as info:
        push_folder(folder, REPO, token=BAD_TOKEN, endpoint=hub_env.url)
    assert BAD_TOKEN not in str(info.value) and "write" in str(info.value)
    assert hub_env.server.commit_count == 0


def test_incomplete_folder_is_refused_before_any_request(hub_env, tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(errors.PushError, match="model.safetensors"):
        _push(folder, hub_env)
    assert not [r for r in hub_env.server.requests if REPO in r.path]


def test_unknown_branch_is_a_revision_error(hub_env, out_folder):
    folder, _ = out_folder
    with pytest.raises(errors.RevisionNotFoundError):
        _push(folder, hub_env, revision="no-such-branch")


def test_new_weights_of_the_same_size_are_pushed(hub_env, out_folder, timm_folder_factory):
    folder, _ = out_folder
    _push(folder, hub_env)
    retrained, _ = timm_folder_factory("retrained", seed=8)
    new_weights = (retrained / "model.safetensors").read_bytes()
    assert len(new_weights) == (folder / "model.safetensors").stat().st_size  # only the sha256 tells them apart
    (folder / "model.safetensors").write_bytes(new_weights)

    result = _push(folder, hub_env)

    assert result.files == ("model.safetensors",)
    assert hub_env.server.files(REPO)["model.safetensors"] == new_weights
