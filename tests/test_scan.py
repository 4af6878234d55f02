"""`agme scan` and the detection under it, on real trained models.

A backdoored ResNet (white patch, target 1) must be flagged with the right target and exit 40; a clean one
trained by the same recipe without poison must not (exit 0); `agme clean` with neither trigger nor target
leaves the clean one as it was and says so. These two are the session's ``backdoored`` models (trained once per
run and shared with the other modules; the scan study's ``fmnist-white-br`` and ``fmnist-clean-s0`` are the same
recipe, checked below). A full-image (blend) backdoor must be flagged by the full-image evidence (the model
test_engine_proof trains; shared within a run). The 20-class model (MNIST digits + Fashion-MNIST items, cached:
trained once per machine) checks that the joint screening still finds the target beyond 10 classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from agme_hub.constants import BACKDOOR_SUSPECTED_EXIT_CODE, CARD_NAME, REPORT_NAME, WEIGHTS_NAME
from agme_hub.data import ImageSet, Preprocessor, balanced_indices, load_images
from agme_hub.engine.detection import detect_target_fast, null_threshold, outlier_scores, screen_classes
from agme_hub.engine.metrics import measure
from agme_hub.hub.checkpoint import load_model
from agme_hub.lab.backdoor import create_classifier
from agme_hub.lab.scan_study import STUDY_MODELS, edit_images, study_config, study_model
from agme_hub.report import CleanReport
from cli import app

from .conftest import TEST_TARGET

runner = CliRunner()
TRIGGER = "badnets-white-br"


@pytest.fixture(scope="module")
def scan_data(tmp_path_factory) -> Path:
    """10 clean Fashion-MNIST test images per class, as a user would pass them."""
    data = load_images("fashion-mnist")
    keep = balanced_indices(data.labels, 10, seed=3)
    path = tmp_path_factory.mktemp("scan") / "clean.npz"
    np.savez(path, x=data.images[keep], y=data.labels[keep])
    return path


@pytest.fixture(scope="module")
def backdoored_model(backdoored) -> Path:
    return backdoored(TRIGGER).out_dir


@pytest.fixture(scope="module")
def clean_model(backdoored) -> Path:
    return backdoored(TRIGGER, poison_rate=0.0).out_dir


def test_the_session_models_are_the_scan_study_recipe(backdoored):
    """The scan study's numbers describe the models tested here: the same training config, field for field."""
    assert backdoored(TRIGGER).config == study_config(STUDY_MODELS["fmnist-white-br"])
    assert backdoored(TRIGGER, poison_rate=0.0).config == study_config(STUDY_MODELS["fmnist-clean-s0"])


def _scan(*args: object):
    return runner.invoke(app, ["scan", *(str(a) for a in args)])


def test_scan_flags_a_backdoored_model_and_writes_its_report(backdoored_model, scan_data, tmp_path):
    out = tmp_path / "report"
    result = _scan(backdoored_model, "--data", scan_data, "--json", "--report", out)
    assert result.exit_code == BACKDOOR_SUSPECTED_EXIT_CODE, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "backdoor suspected"
    assert report["suspected"][0]["index"] == STUDY_MODELS["fmnist-white-br"].target
    assert "patch" in report["suspected"][0]["evidence"]
    assert report["suspected"][0]["anomaly_index"] > report["threshold"] > 2
    assert report["suspected"][0]["attack_success"] >= 0.5
    assert [entry["index"] for entry in report["ranking"]][0] == report["target"]
    assert len(report["ranking"]) == 10
    written = json.loads((out / "scan_report.json").read_text())
    assert written["verdict"] == report["verdict"]
    assert report["full_eps"] > 0 and all(entry["full_eps"] is not None for entry in report["ranking"])
    for name in report["suspected"][0]["files"]:
        assert (out / name).is_file()
    assert not list(tmp_path.glob(".report.tmp-*"))  # the temporary folder was moved into place


def test_scan_finds_no_evidence_in_a_clean_model_and_writes_nothing(clean_model, scan_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _scan(clean_model, "--data", scan_data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "no evidence" and report["suspected"] == []
    assert list(tmp_path.iterdir()) == []


def test_clean_without_trigger_or_target_leaves_a_clean_model_intact(clean_model, scan_data, tmp_path):
    """What `clean` does when its detection finds no evidence. The detection is the scan's (the same function, model,
    images and seed); that it finds none at the default steps is the test above, so here it runs shorter."""
    source = clean_model
    out = tmp_path / "out"
    held_out = load_images("fashion-mnist")
    held_out = held_out.subset(balanced_indices(held_out.labels, 50, seed=11))
    eval_path = tmp_path / "held_out.npz"
    np.savez(eval_path, x=held_out.images, y=held_out.labels)
    result = runner.invoke(app, ["clean", str(source), "--data", str(scan_data), "--eval-data", str(eval_path),
                                 "--inversion-steps", "50", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = CleanReport.load(out)
    assert report.target.detected and report.target.evidence is False
    assert report.method.layers == []
    assert "no evidence of a backdoor" in (out / CARD_NAME).read_text()
    before, after = load_model(source), load_model(out)
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name
    ca = [measure(m, held_out, Preprocessor.from_model(m)).clean_accuracy for m in (before, after)]
    assert ca[0] - ca[1] <= 0.005
    assert (out / REPORT_NAME).is_file() and (out / WEIGHTS_NAME).is_file()


def test_a_full_image_backdoor_is_found_by_the_full_image_evidence(backdoored):
    """A blend trigger (the whole image, 15% noise): the smallest full-image perturbation reaches its target.

    Whether it is also *flagged* is not asserted: its index sits at the 10-class threshold (2.21-2.33 against
    2.29 over three draws of D on one machine, above it on another), so the verdict depends on float rounding.
    """
    model = backdoored("blend:alpha=0.15").model
    detection = detect_target_fast(model, edit_images("fashion-mnist", seed=3))
    assert detection.target == TEST_TARGET and detection.full.leader == TEST_TARGET


def test_the_threshold_keeps_a_clean_models_false_positive_rate_under_the_null():
    """Sizes of a clean model's classes (log-normal, two statistics): the verdict's largest index passes the
    threshold 5% of the time. More classes, a higher threshold (the smallest of more values lies further out)."""
    rng = np.random.default_rng(1)
    sizes = np.exp(rng.normal(4.0, 0.4, (3000, 2, 10)))
    largest = np.array([max(outlier_scores(draw[0]).max(), outlier_scores(draw[1]).max()) for draw in sizes])
    threshold = null_threshold((10, 10))
    assert abs(float((largest > threshold).mean()) - 0.05) < 0.015
    assert threshold > 2 and null_threshold((100, 33)) > null_threshold((10, 10))


def test_twenty_classes_detection_finds_the_target():
    spec = STUDY_MODELS["twenty-white-br-t13"]
    model = load_model(study_model(spec.name))
    detection = detect_target_fast(model, edit_images(spec.dataset))  # 10 clean test images per class
    assert detection.target == spec.target and detection.flagged


def test_screening_spends_its_budget_evenly_over_many_classes():
    """100 classes, one inversion's budget: every class the same updates, all within the budget."""
    torch.manual_seed(0)
    model = create_classifier("resnet10t", num_classes=100, in_chans=1, img_size=8, mean=(0.5,), std=(0.25,),
                              model_args={"channels": [4, 8, 8, 8]}).eval()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 2)
    data = ImageSet(rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8), labels, [str(i) for i in range(100)], "r")
    screening = screen_classes(model, data, list(range(100)), budget=20 * 64 * 8, seed=0)
    assert screening.image_passes <= 20 * 64 * 8
    assert screening.image_passes == 100 * screening.updates * screening.images
    assert screening.norms.shape == (100,) and np.isfinite(screening.norms).all()


def test_detection_over_a_thousand_classes_stays_within_three_inversions(monkeypatch):
    """1000 classes: prescreen, both screenings and the two full inversions, counted in image passes, fit in
    ``screen_share + top_k`` inversions (the prescreen is taken out of the screening's budget)."""
    import agme_hub.engine.detection as detection

    k, steps, batch = 1000, 40, 64
    torch.manual_seed(0)
    model = create_classifier("resnet10t", num_classes=k, in_chans=1, img_size=8, mean=(0.5,), std=(0.25,),
                              model_args={"channels": [4, 8, 8, 8]}).eval()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(k), 2)
    data = ImageSet(rng.integers(0, 256, (2 * k, 8, 8, 1), dtype=np.uint8), labels, [str(i) for i in range(k)], "r")
    passes: dict[str, int] = {}

    def counted(name, count):  # type: ignore[no-untyped-def]
        real = getattr(detection, name)

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = real(*args, **kwargs)
            passes[name] = passes.get(name, 0) + count(result, kwargs)
            return result
        monkeypatch.setattr(detection, name, run)

    counted("prescreen", lambda result, kw: kw["steps"] * batch)
    counted("screen_classes", lambda result, kw: result.image_passes)
    counted("screen_full", lambda result, kw: result.image_passes)
    counted("invert_trigger", lambda result, kw: kw["steps"] * kw["batch_size"])
    found = detect_target_fast(model, data, steps=steps, batch_size=batch)
    assert set(passes) == {"prescreen", "screen_classes", "screen_full", "invert_trigger"}
    assert sum(passes.values()) <= 3 * steps * batch
    assert len(found.ranking) == k


def test_scan_report_words_both_kinds_of_evidence():
    """The CLI's table and evidence lines (ScanReport.table, evidence_lines) for a full-image-only suspect."""
    from agme_hub.app.scan import RankedClass, ScanReport, SuspectedTarget

    suspect = SuspectedTarget(index=0, label="T-shirt/top", evidence=["full-image"], anomaly_index=1.96, mask_l1=30.1,
                              mask_fraction=0.0294, attack_success=0.9, full_anomaly_index=2.6, full_eps=0.0183,
                              full_success=0.5)
    other = SuspectedTarget(index=8, label="Bag", anomaly_index=1.2, mask_l1=41.0, mask_fraction=0.04,
                            attack_success=0.7, full_anomaly_index=0.3, full_eps=0.1)
    ranking = [RankedClass(index=0, label="T-shirt/top", mask_l1=29.4, anomaly_index=1.96, full_eps=0.0183,
                           full_anomaly_index=2.6), RankedClass(index=8, label="Bag", mask_l1=41.5, anomaly_index=1.2)]
    report = ScanReport(verdict="backdoor suspected", target=0, anomaly_index=1.96, mask_l1=30.1, attack_success=0.9,
                        suspected=[suspect], ranking=ranking, inverted=[suspect, other], num_classes=10, n_images=100,
                        seconds=1.0, threshold=2.287)
    (line,) = report.evidence_lines()
    assert "outlier by full-image" in line and "4.7/255 reaches 50.0%" in line and "above 2.29" in line
    columns, rows = report.table()
    assert rows[0][columns.index("full-image eps")] == "4.7/255" and rows[1][columns.index("index (full)")] == "-"
    quiet = ScanReport(**{**report.__dict__, "verdict": "no evidence", "suspected": [], "inverted": [other]})
    assert quiet.evidence_lines()[0].startswith("leading class (not an outlier): 8 (Bag)")
    assert "reaches about half" in quiet.evidence_lines()[0]
    assert json.loads(json.dumps(quiet.to_json()))["full_eps"] is None


def test_the_scan_studys_tally_counts_taken_backdoors_and_clean_models_apart():
    """``scan_study summary``: TPR over the backdoors that took, right targets among them, FPR over clean models."""
    from agme_hub.errors import UsageError
    from agme_hub.lab.scan_study import match_models, summarize_rows

    def row(arch, backdoored, verdict, right=None, took=None):
        return {"arch": arch, "backdoored": backdoored, "verdict": verdict, "right_target": right, "took": took}

    rows = [row("vit", True, "backdoor suspected", True, True), row("vit", True, "no evidence", True, True),
            row("vit", True, "backdoor suspected", False, False),  # did not take: counted apart
            row("vit", False, "backdoor suspected"), row("vit", False, "no evidence"),
            row("resnet10t", True, "backdoor suspected", True, None)]  # older rows carry no `took`
    vit, resnet, overall = summarize_rows(rows)
    assert vit == {"family": "vit", "backdoored": 2, "flagged": 1, "right_target": 2, "clean": 2, "clean_flagged": 1,
                   "not_taken": 1}
    assert resnet["backdoored"] == resnet["flagged"] == 1 and overall["backdoored"] == 3 and overall["not_taken"] == 1
    assert match_models(["vit-clean-*", "fmnist-white-br"]) == ["fmnist-white-br", "vit-clean-s0", "vit-clean-s1"]
    assert len(match_models(["bench-*"])) == 50  # the five-family bench: 5 families x 10 triggers
    with pytest.raises(UsageError, match="no study model matches"):
        match_models(["bench-regnet-*"])
