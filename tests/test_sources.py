"""resolve_source against a real huggingface_hub client talking to the test Hub server (tests/hub_server.py)."""

from __future__ import annotations

import json

import pytest
import torch

from agme_hub import errors
from agme_hub.hub.checkpoint import load_model
from agme_hub.hub.sources import map_hub_error, resolve_source
from tests.fixtures_hub import BAD_TOKEN, GOOD_TOKEN, forward_once, read_folder

REPO = "org/tiny"


def _load(folder, *, allow_pickle: bool = False) -> torch.nn.Module:
    return load_model(folder, allow_pickle=allow_pickle)


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    return forward_once(model)


@pytest.fixture
def two_commits(hub_env, timm_folder_factory):
    """REPO with two commits of different weights; returns (sha1, model1, sha2, model2)."""
    folder1, model1 = timm_folder_factory("v1", seed=1)
    folder2, model2 = timm_folder_factory("v2", seed=2)
    sha1 = hub_env.server.commit(REPO, read_folder(folder1))
    sha2 = hub_env.server.commit(REPO, read_folder(folder2))
    return sha1, model1, sha2, model2


def test_pull_by_repo_id_fetches_only_timm_files(hub_env, timm_folder_factory):
    folder, model = timm_folder_factory("m")
    files = {**read_folder(folder), "README.md": b"---\nlicense: mit\n---\n# tiny\n",
             "pytorch_model.bin": b"pickle bytes", "notes.txt": b"not needed"}
    sha = hub_env.server.commit(REPO, files)

    src = resolve_source(REPO)

    assert (src.kind, src.repo_id, src.revision, src.requested_revision) == ("hub", REPO, sha, None)
    assert src.local_dir.name == sha and src.ref == f"{REPO}@{sha}"
    assert set(src.files) == set(files) | {".gitattributes"}
    # allow_patterns: the pickle and unrelated files stay on the Hub.
    assert sorted(p.name for p in src.local_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert src.license == "mit"
    torch.testing.assert_close(_outputs(_load(src.local_dir)), _outputs(model), rtol=0, atol=0)
    assert any("agme/" in r.user_agent for r in hub_env.server.requests)
    # Even when pickles are allowed they are not fetched while safetensors exist.
    assert not (resolve_source(REPO, allow_pickle=True).local_dir / "pytorch_model.bin").exists()


@pytest.mark.parametrize("form", ["at", "hf-hub-at", "kwarg", "branch"])
def test_pinned_revision_gives_old_weights(hub_env, two_commits, form):
    sha1, model1, sha2, model2 = two_commits
    hub_env.server.repos[REPO].refs["v1"] = sha1  # a branch that still points at the first commit
    source, revision = {
        "at": (f"{REPO}@{sha1}", None), "hf-hub-at": (f"hf-hub:{REPO}@{sha1}", None),
        "kwarg": (REPO, sha1), "branch": (f"{REPO}@v1", None),
    }[form]

    old = resolve_source(source, revision=revision)
    new = resolve_source(f"hf-hub:{REPO}")

    assert old.revision == sha1 and new.revision == sha2
    assert old.requested_revision == ("v1" if form == "branch" else sha1)
    torch.testing.assert_close(_outputs(_load(old.local_dir)), _outputs(model1), rtol=0, atol=0)
    torch.testing.assert_close(_outputs(_load(new.local_dir)), _outputs(model2), rtol=0, atol=0)
    assert not torch.equal(_outputs(model1), _outputs(model2))


def test_files_match_the_resolved_sha_even_if_the_branch_moves_meanwhile(hub_env, two_commits, timm_folder_factory,
                                                                        monkeypatch):
    from huggingface_hub import HfApi

    sha1, model1, sha2, model2 = two_commits
    folder3, _ = timm_folder_factory("v3", seed=3)
    real_model_info = HfApi.model_info

    def model_info_then_someone_pushes(self, *args, **kwargs):
        info = real_model_info(self, *args, **kwargs)
        hub_env.server.commit(REPO, read_folder(folder3))
        return info

    monkeypatch.setattr(HfApi, "model_info", model_info_then_someone_pushes)
    src = resolve_source(REPO)

    assert src.revision == sha2 and src.local_dir.name == sha2
    torch.testing.assert_close(_outputs(_load(src.local_dir)), _outputs(model2), rtol=0, atol=0)


def test_same_revision_twice_is_fine_but_different_is_a_usage_error(hub_env, two_commits):
    sha1, _, sha2, _ = two_commits
    assert resolve_source(f"{REPO}@{sha1}", revision=sha1).revision == sha1
    with pytest.raises(errors.UsageError, match="two different revisions"):
        resolve_source(f"{REPO}@{sha1}", revision=sha2)


def test_timm_pretrained_name_maps_to_its_hub_repo(hub_env, timm_folder_factory):
    folder, _ = timm_folder_factory("m")
    sha = hub_env.server.commit("timm/resnet18.a1_in1k", read_folder(folder))
    src = resolve_source("resnet18.a1_in1k")
    assert (src.repo_id, src.revision) == ("timm/resnet18.a1_in1k", sha)


def test_local_folder(timm_folder_factory, tmp_path):
    folder, model = timm_folder_factory("local")
    src = resolve_source(str(folder))
    assert (src.kind, src.repo_id, src.revision, src.local_dir) == ("local", None, None, folder.resolve())
    assert set(src.files) == {"config.json", "model.safetensors"}
    assert resolve_source(f"local-dir:{folder}").local_dir == folder.resolve()
    with pytest.raises(errors.UsageError, match="local folder"):
        resolve_source(str(folder), revision="main")
    with pytest.raises(errors.RepoNotFoundError, match="not found"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(errors.UsageError):
        resolve_source("org/name/extra")


def test_non_timm_repo_is_refused_naming_what_was_found(hub_env, timm_folder_factory):
    folder, _ = timm_folder_factory("m")
    config = {"architectures": ["BertModel"], "model_type": "bert"}
    hub_env.server.commit("org/bert", {"config.json": json.dumps(config).encode(),
                                       "model.safetensors": (folder / "model.safetensors").read_bytes()})
    with pytest.raises(errors.UnsupportedFormatError) as info:
        resolve_source("org/bert")
    message = str(info.value)
    assert "org/bert@" in message and "transformers (model_type=bert)" in message
    assert str(hub_env.cache_dir) not in message


def test_pickle_only_repo_refused_unless_allowed(hub_env, timm_folder_factory, tmp_path):
    folder, model = timm_folder_factory("m")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    hub_env.server.commit("org/pickled", {"config.json": (folder / "config.json").read_bytes(),
                                          "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()})

    with pytest.raises(errors.PickleRefusedError, match="--allow-pickle"):
        resolve_source("org/pickled")
    assert not list(hub_env.cache_dir.rglob("pytorch_model.bin")), "refused pickle must not be downloaded"

    src = resolve_source("org/pickled", allow_pickle=True)
    assert (src.local_dir / "pytorch_model.bin").is_file()
    torch.testing.assert_close(_outputs(_load(src.local_dir, allow_pickle=True)), _outputs(model), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_repo", errors.RepoNotFoundError),
        ("missing_revision", errors.RevisionNotFoundError),
        ("bad_token", errors.UnauthorizedError),
        ("gated", errors.GatedRepoError),
    ],
)
def test_hub_errors_map_to_agme_errors(hub_env, timm_folder_factory, case, expected):
    folder, _ = timm_folder_factory("m")
    hub_env.server.commit(REPO, read_folder(folder))
    hub_env.server.gate("org/gated", allowed_tokens={"hf_friend"})
    hub_env.server.commit("org/gated", read_folder(folder))
    source, kwargs = {
        "missing_repo": ("org/nope", {}),
        "missing_revision": (f"{REPO}@no-such-branch", {}),
        "bad_token": (REPO, {"token": BAD_TOKEN}),
        "gated": ("org/gated", {}),
    }[case]

    with pytest.raises(expected) as info:
        resolve_source(source, **kwargs)

    message = str(info.value)
    assert type(info.value) is expected and "\n" not in message
    assert BAD_TOKEN not in message and GOOD_TOKEN not in message
    assert info.value.exit_code == expected.exit_code


def test_gated_repo_with_access_resolves(hub_env, timm_folder_factory):
    folder, _ = timm_folder_factory("m")
    hub_env.server.gate("org/gated", allowed_tokens={"hf_friend"})
    sha = hub_env.server.commit("org/gated", read_folder(folder))
    assert resolve_source("org/gated", token="hf_friend").revision == sha


def test_offline_rerun_uses_cache_after_server_stops(hub_env, two_commits, monkeypatch):
    sha1, model1, sha2, model2 = two_commits
    online = resolve_source(REPO)
    pinned = resolve_source(f"{REPO}@{sha1}")
    hub_env.server.stop()

    again = resolve_source(REPO, offline=True)
    assert (again.revision, again.local_dir, again.offline) == (online.revision, online.local_dir, True)
    torch.testing.assert_close(_outputs(_load(again.local_dir)), _outputs(model2), rtol=0, atol=0)
    assert resolve_source(f"{REPO}@{sha1}", offline=True).local_dir == pinned.local_dir

    # HF_HUB_OFFLINE=1 (parsed by huggingface_hub at import) turns offline mode on without the flag.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_source(REPO).revision == sha2


def test_offline_with_empty_cache_is_a_cache_miss(hub_env):
    with pytest.raises(errors.OfflineCacheMissError) as info:
        resolve_source(REPO, offline=True)
    assert "\n" not in str(info.value) and REPO in str(info.value)
    assert not [r for r in hub_env.server.requests if REPO in r.path], "offline mode must not ask the Hub"


def test_unreachable_hub_is_a_network_error(hub_env):
    hub_env.server.stop()
    with pytest.raises(errors.NetworkError, match="cannot reach the Hub"):
        resolve_source(REPO)


def test_dry_run_lists_files_without_downloading_weights(hub_env, timm_folder_factory):
    folder, _ = timm_folder_factory("m")
    sha = hub_env.server.commit(REPO, read_folder(folder))

    src = resolve_source(REPO, dry_run=True)

    assert src.dry_run and src.revision == sha and "model.safetensors" in src.files
    assert not (src.local_dir / "model.safetensors").exists()
    assert not [r for r in hub_env.server.requests if r.path.endswith("model.safetensors")]


def test_map_hub_error_scrubs_token_and_ignores_foreign_errors():
    from huggingface_hub.errors import OfflineModeIsEnabled

    secret = "hf_secret_value"
    mapped = map_hub_error(OfflineModeIsEnabled(f"token {secret} leaked"), repo_id=REPO, token=secret)
    assert isinstance(mapped, errors.OfflineCacheMissError) and secret not in str(mapped)
    assert map_hub_error(KeyError("x"), repo_id=REPO) is None
    assert isinstance(map_hub_error(ConnectionRefusedError(), repo_id=REPO), errors.NetworkError)
