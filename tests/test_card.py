"""Tests of agme_hub.hub.card: rendering, offline validation and writing of the model card. No torch, no network."""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard, ModelCardData

from agme_hub.hub import card
from agme_hub.hub.card import render_card, rerender_card, template_path, validate_card, write_card
from agme_hub.constants import AGME_MARKER, CARD_NAME, REPORT_NAME
from agme_hub.errors import OutputExistsError, RepoNotFoundError, UsageError

SHA = "0123456789abcdef0123456789abcdef01234567"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FULL_REPORT: dict[str, Any] = {
    "agme_version": "0.1.0", "status": "complete",
    "source": "org/name", "source_kind": "hub", "revision": SHA,
    "base_model": "org/name", "license": "apache-2.0",
    "architecture": "resnet18", "num_classes": 10, "label_names": LABELS,
    "mode": "bdk",
    "trigger": {"spec": "patch:size=3,pos=bottom-right,fill=white", "kind": "given"},
    "target": {"index": 0, "label": "T-shirt/top", "detected": True, "anomaly_index": 3.4,
               "ranking": [[0, 0.91], [6, 0.2]]},
    "n_edit_images": 100, "per_class": 10,
    "data": {"edit": "fashion-mnist", "eval": "held-out part of --data (not used for editing)", "n_eval_images": 4000},
    "method": {"name": "agme", "lam": 0.01, "gamma": 1.0, "layers": ["fc"], "repair": True, "target_weight": 4.0,
               "refitted": "", "augment_copies": 9, "bn_stats": "keep", "seed": 0,
               "selection": "5-fold cross-validation on the edit images chose layers=['fc'] lam=0.01 (score 0.97)"},
    "before": {"clean_accuracy": 0.891, "attack_success_rate": 0.998, "target_accuracy": 0.85, "robust_accuracy": 0.01},
    "after": {"clean_accuracy": 0.884, "attack_success_rate": 0.012, "target_accuracy": 0.83, "robust_accuracy": 0.86},
    "asr_measured_with": "given trigger",
    "timing": {"load": 0.5, "capture": 1.2, "edit": 0.1, "repair": 0.0, "eval": 2.0, "save": 0.1, "total": 4.0},
    "runtime": {"device": "cuda:0", "batch_size": 256},
    "output_dir": "/abs/out",
    "push": {"repo_id": "org/name-agme", "commit_url": "https://hub.example/c", "pr_url": None},
    "provenance": {"weights_sha256": "ab" * 32,
                   "versions": {"agme": "0.1.0", "torch": "2.14.1", "timm": "1.0.31", "huggingface_hub": "2.4.0",
                                "safetensors": "0.8.0"}},
    "command": "agme clean org/name --data fashion-mnist --trigger 'patch:size=3' --target 0 --per-class 10",
}


def sparse_report() -> dict[str, Any]:
    """A local source, no license, no trigger, no push, and most numbers not measured (None or nan)."""
    report = copy.deepcopy(FULL_REPORT)
    report.update(
        source="/data/models/my-net", source_kind="local", revision=None, base_model=None, license=None,
        mode="no-bdk", trigger={"spec": None, "kind": None}, asr_measured_with=None, push=None,
        target={"index": 3, "label": None, "detected": False, "anomaly_index": None, "ranking": None},
        n_edit_images=None, per_class=None, data={"edit": None, "eval": None, "n_eval_images": None},
        before={"clean_accuracy": 0.9, "attack_success_rate": None, "target_accuracy": None,
                "robust_accuracy": float("nan")},
        after={"clean_accuracy": 0.88, "attack_success_rate": None, "target_accuracy": float("nan"),
               "robust_accuracy": None},
        timing=None, provenance={"weights_sha256": None, "versions": None}, command=None, label_names=None,
    )
    report["method"] = {"name": "agme", "lam": None, "gamma": None, "layers": None, "repair": None, "selection": None}
    return report


def metadata(text: str) -> dict[str, Any]:
    return ModelCard(text).data.to_dict()


def metrics_of(text: str) -> dict[str, float]:
    """Map metric type to value over every result of the card's model-index."""
    (entry,) = metadata(text)["model-index"]
    return {m["type"]: m["value"] for result in entry["results"] for m in result["metrics"]}


def assert_clean_text(text: str) -> None:
    assert AGME_MARKER in text
    assert not re.search(r"\bNone\b", text), "a None leaked into the card"
    assert not re.search(r"\bnan\b", text, flags=re.IGNORECASE), "a nan leaked into the card"
    assert not re.search(r"\bnull\b", text), "a null leaked into the metadata"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cards are rendered and validated offline: any socket use fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("agme_hub.hub.card touched the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_template_is_found() -> None:
    assert template_path().is_file()
    assert template_path().name == "agme_card.md.jinja"


def test_packaged_template_wins_over_the_repository_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = tmp_path / "agme_hub" / "model_cards" / "agme_card.md.jinja"
    packaged.parent.mkdir(parents=True)
    packaged.write_text(template_path().read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(card.resources, "files", lambda package: tmp_path / package)
    assert template_path() == packaged
    validate_card(render_card(FULL_REPORT))


def test_full_report_renders_a_valid_card() -> None:
    text = render_card(FULL_REPORT)
    validate_card(text, base_model="org/name")
    assert_clean_text(text)
    assert text.startswith("---\n")
    data = metadata(text)
    assert data["base_model"] == "org/name"
    assert data["base_model_relation"] == "finetune"
    assert data["library_name"] == "timm"
    assert data["pipeline_tag"] == "image-classification"
    assert data["license"] == "apache-2.0"
    assert data["tags"] == ["image-classification", "timm", "agme", "backdoor-removal", "safetensors"]
    assert data["agme"]["source_revision"] == SHA
    assert data["model-index"][0]["name"] == "name-agme"
    assert metrics_of(text) == {"accuracy": 0.884, "attack_success_rate": 0.012, "target_class_accuracy": 0.83,
                                "robust_accuracy": 0.86}


def test_full_report_body() -> None:
    text = render_card(FULL_REPORT)
    assert f"sanitized derivative of [`org/name`](https://huggingface.co/org/name) at commit `{SHA}`" in text
    assert "| Clean accuracy | 89.1% | 88.4% | -0.7 points |" in text
    assert "| Attack success rate | 99.8% | 1.2% | -98.6 points |" in text
    assert "| Robust accuracy | 1.0% | 86.0% | +85.0 points |" in text
    assert "100 clean images (10 per class) from fashion-mnist" in text
    assert "4000 images from held-out part of --data" in text
    assert "**Time taken:** 4.0 s" in text and "on cuda:0, batches of 256" in text
    assert "`patch:size=3,pos=bottom-right,fill=white`" in text
    assert "anomaly index 3.40" in text and "| 2 | 6 | Shirt | 0.200 |" in text
    assert "| lam | 0.01 |" in text and "| Edited layers | `fc` |" in text and "| Repair | yes |" in text
    assert "| Classifier re-fitted by the repair | no |" in text  # the edit rewrote the classifier itself
    assert FULL_REPORT["method"]["selection"] in text
    assert "ab" * 32 in text and "| timm | 1.0.31 |" in text
    assert 'timm.create_model("hf-hub:org/name-agme", pretrained=True)' in text
    assert FULL_REPORT["command"] in text
    assert "## Limitations" in text and "2407.07662" in text and "not the authors' code" in text


def test_a_re_fitted_classifier_is_named() -> None:
    report = copy.deepcopy(FULL_REPORT)
    report["method"].update(layers=["layer4.0.conv1"], refitted="fc")
    assert "| Classifier re-fitted by the repair | `fc` |" in render_card(report)
    del report["method"]["refitted"]  # a report from before the field: not recorded, not "no"
    assert "| Classifier re-fitted by the repair | not recorded |" in render_card(report)


def test_sparse_report_renders_a_valid_card() -> None:
    report = sparse_report()
    text = render_card(report)
    validate_card(text)
    assert_clean_text(text)
    data = metadata(text)
    assert "license" not in data
    assert "base_model" not in data and "base_model_relation" not in data
    assert data["library_name"] == "timm" and data["pipeline_tag"] == "image-classification"
    assert metrics_of(text) == {"accuracy": 0.88}
    assert "| Attack success rate | not measured | not measured | not measured |" in text
    assert "| Robust accuracy | not measured | not measured | not measured |" in text
    assert "**Time taken:** not measured" in text
    assert "none: no trigger was used" in text
    assert "local folder `/data/models/my-net`" in text
    assert 'timm.create_model("local-dir:/abs/out", pretrained=True)' in text


@pytest.mark.parametrize("missing", ["clean_accuracy", "attack_success_rate", "target_accuracy", "robust_accuracy"])
def test_model_index_holds_exactly_the_measured_after_metrics(missing: str) -> None:
    report = copy.deepcopy(FULL_REPORT)
    report["after"][missing] = None
    types = {"clean_accuracy": "accuracy", "attack_success_rate": "attack_success_rate",
             "target_accuracy": "target_class_accuracy", "robust_accuracy": "robust_accuracy"}
    text = render_card(report)
    validate_card(text, base_model="org/name")
    assert set(metrics_of(text)) == set(types.values()) - {types[missing]}


def test_surrogate_trigger_is_named_as_such() -> None:
    report = copy.deepcopy(FULL_REPORT)
    report.update(mode="no-bdk", trigger={"spec": "mask:learned", "kind": "surrogate"},
                  asr_measured_with="surrogate trigger (reconstructed, not the real one)")
    text = render_card(report)
    validate_card(text)
    (entry,) = metadata(text)["model-index"]
    names = {m["type"]: m["name"] for result in entry["results"] for m in result["metrics"]}
    assert names["attack_success_rate"] == "Attack success rate (surrogate trigger)"
    assert "measured with the **surrogate trigger**" in text
    assert "the attack success rate (with the surrogate trigger) went from 99.8% to 1.2%" in text
    assert "a surrogate reconstructed by agme (not the real trigger)" in text


def test_pull_request_push_is_explained() -> None:
    report = copy.deepcopy(FULL_REPORT)
    report["push"] = {"repo_id": "org/name", "commit_url": None, "pr_url": "https://hub.example/org/name/discussions/1"}
    text = render_card(report)
    assert 'hf-hub:org/name"' in text and "[pull request](https://hub.example/org/name/discussions/1)" in text


def test_table_cells_are_escaped() -> None:
    report = copy.deepcopy(FULL_REPORT)
    report["label_names"] = ["a|b", *LABELS[1:]]
    text = render_card(report)
    assert "| 1 | 0 | a\\|b | 0.910 |" in text


def test_no_change_prints_as_zero_points() -> None:
    report = copy.deepcopy(FULL_REPORT)
    report["after"]["clean_accuracy"] = report["before"]["clean_accuracy"] = 0.5
    assert "| Clean accuracy | 50.0% | 50.0% | +0.0 points |" in render_card(report)


def test_render_is_deterministic() -> None:
    assert render_card(FULL_REPORT) == render_card(copy.deepcopy(FULL_REPORT))


def _with_metadata(text: str, change: dict[str, Any]) -> str:
    """Rebuild a rendered card with some metadata keys replaced (None deletes a key)."""
    card = ModelCard(text)
    data = card.data.to_dict()
    for key, value in change.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return f"---\n{ModelCardData(**data).to_yaml()}\n---\n{card.text}"


@pytest.mark.parametrize(("change", "message"), [
    ({"model-index": None}, "model-index is missing"),
    ({"library_name": "transformers"}, "library_name must be 'timm'"),
    ({"pipeline_tag": "text-generation"}, "pipeline_tag must be 'image-classification'"),
    ({"tags": ["timm"]}, "tags must include agme, backdoor-removal"),
])
def test_validate_card_rejects_bad_metadata(change: dict[str, Any], message: str) -> None:
    text = _with_metadata(render_card(FULL_REPORT), change)
    with pytest.raises(ValueError, match=message) as info:
        validate_card(text)
    assert "\n" not in str(info.value)


def test_validate_card_rejects_wrong_base_model_and_broken_yaml() -> None:
    text = render_card(FULL_REPORT)
    with pytest.raises(ValueError, match="base_model must be 'other/model'"):
        validate_card(text, base_model="other/model")
    with pytest.raises(ValueError, match="no YAML metadata"):
        validate_card("# just a title\n")
    with pytest.raises(ValueError, match="metadata is invalid"):
        validate_card("---\nlicense: [\n---\n")
    broken_index = text.replace("    dataset:\n", "    dataset_gone:\n")
    with pytest.raises(ValueError, match="metadata is invalid") as info:
        validate_card(broken_index)
    assert "\n" not in str(info.value)


def test_write_card_and_rerender_round_trip(tmp_path: Path) -> None:
    path = write_card(tmp_path, FULL_REPORT)
    assert path == tmp_path / CARD_NAME
    assert path.read_text(encoding="utf-8") == render_card(FULL_REPORT)
    assert [p.name for p in tmp_path.iterdir()] == [CARD_NAME]  # no temporary file left behind

    report = sparse_report()
    report["after"]["target_accuracy"] = None  # JSON has no nan; the CLI writes null
    (tmp_path / REPORT_NAME).write_text(json.dumps(report), encoding="utf-8")
    assert rerender_card(tmp_path) == path  # replaces agme's own card without asking
    text = path.read_text(encoding="utf-8")
    assert text == render_card(report)
    validate_card(text)
    assert "license" not in metadata(text)


def test_write_card_keeps_a_users_readme(tmp_path: Path) -> None:
    (tmp_path / CARD_NAME).write_text("# my own card\n", encoding="utf-8")
    with pytest.raises(OutputExistsError):
        write_card(tmp_path, FULL_REPORT)
    assert (tmp_path / CARD_NAME).read_text(encoding="utf-8") == "# my own card\n"
    write_card(tmp_path, FULL_REPORT, overwrite=True)
    assert AGME_MARKER in (tmp_path / CARD_NAME).read_text(encoding="utf-8")


def test_write_card_refuses_a_card_that_does_not_validate(tmp_path: Path) -> None:
    report = copy.deepcopy(FULL_REPORT)
    report["after"] = dict.fromkeys(report["after"])  # nothing measured: no model-index
    with pytest.raises(ValueError, match="model-index is missing"):
        write_card(tmp_path, report)
    assert not (tmp_path / CARD_NAME).exists()


def test_rerender_card_errors(tmp_path: Path) -> None:
    with pytest.raises(RepoNotFoundError):
        rerender_card(tmp_path / "missing")
    with pytest.raises(UsageError, match=REPORT_NAME):
        rerender_card(tmp_path)
    (tmp_path / REPORT_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="cannot read"):
        rerender_card(tmp_path)
    (tmp_path / REPORT_NAME).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UsageError, match="JSON object"):
        rerender_card(tmp_path)
