"""transformers image classifiers end to end: real backdoored ViT, ConvNeXt and ResNet (transformers configs).

Each model is trained here by ``train_backdoored(..., format="transformers")`` on 300 Fashion-MNIST images per
class at 32 px and written with ``save_pretrained``. ``agme clean`` then runs on the folder and on the test Hub
(``tests/hub_server.py``); the output must load with ``AutoModelForImageClassification.from_pretrained`` and
``pipeline("image-classification")`` and carry a card with ``library_name: transformers``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import agme_hub  # noqa: E402
from agme_hub import errors  # noqa: E402
from agme_hub.lab.backdoor import BackdoorConfig, train_backdoored  # noqa: E402
from agme_hub.hub.card import validate_card  # noqa: E402
from agme_hub.hub.checkpoint import load_model  # noqa: E402
from agme_hub.constants import CARD_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME  # noqa: E402
from agme_hub.data import split_edit_eval  # noqa: E402
from agme_hub.engine import inspect_layers  # noqa: E402
from agme_hub.options import CleanOptions  # noqa: E402
from agme_hub.app import clean as app_clean  # noqa: E402
from agme_hub.hub.transformers_format import PROCESSOR_CONFIG_NAME, preprocessor_from_processor_config  # noqa: E402
from cli import app  # noqa: E402
from tests.conftest import TEST_TARGET, TEST_TRAINING  # noqa: E402
from tests.fixtures_hub import read_folder  # noqa: E402
from tests.helpers import shipped_fold_scores  # noqa: E402

TRIGGER = "badnets-white-br"


def run_clean(source, options):  # the report as --json and agme_report.json give it
    return app_clean.run_clean(source, options).to_json()


FAMILIES = ["vit", "convnext", "resnet"]
# Training settings per family (the tiny configs are agme_hub.hub.transformers_format.TINY_CONFIGS).
TRAINING = {
    "vit": {**TEST_TRAINING, "epochs": 8, "lr": 2e-3},  # a ViT from scratch needs a few more epochs
    "convnext": {**TEST_TRAINING},
    "resnet": {**TEST_TRAINING},
}
OUTPUT_FILES = {WEIGHTS_NAME, CONFIG_NAME, PROCESSOR_CONFIG_NAME, CARD_NAME, REPORT_NAME}
CLEAN = ["--data", "fashion-mnist", "--per-class", "10", "--eval-per-class", "30", "--augment-copies", "2",
         "--trigger", TRIGGER, "--target", str(TEST_TARGET)]


@pytest.fixture(scope="module")
def hf_backdoored(tmp_path_factory):
    """``hf_backdoored(family)`` -> BackdoorResult with ``out_dir`` (a transformers folder); trained once."""
    cache: dict[str, object] = {}
    root = tmp_path_factory.mktemp("hf-backdoored")

    def make(family: str):
        if family not in cache:
            config = BackdoorConfig(trigger=TRIGGER, arch=family, target=TEST_TARGET, format="transformers",
                                    **TRAINING[family])
            cache[family] = train_backdoored(config, out_dir=root / family)
        return cache[family]

    return make


def agme(*args: object):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


def parse_json(result) -> dict:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return json.loads(result.stdout)


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, repr(result.exception))
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    return lines[0]


def pixel_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.randn(4, 3, 32, 32, generator=generator)


def assert_backdoor_removed(record: dict) -> None:
    before, after = record["before"], record["after"]
    assert before["attack_success_rate"] > 0.8, before
    assert after["attack_success_rate"] < 0.2, (record["method"], before, after)
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.1, (before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_a_local_transformers_folder(hf_backdoored, family, tmp_path):
    trained = hf_backdoored(family)
    out = tmp_path / "out"

    record = parse_json(agme("clean", trained.out_dir, *CLEAN, "--out", out, "--json"))

    assert record["format"] == "transformers" and record["architecture"].endswith("ForImageClassification")
    assert_backdoor_removed(record)
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    validate_card((out / CARD_NAME).read_text(), library_name="transformers")
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["id2label"][str(TEST_TARGET)] == "Trouser"
    assert json.loads((out / PROCESSOR_CONFIG_NAME).read_text()) == \
        json.loads((trained.out_dir / PROCESSOR_CONFIG_NAME).read_text())
    # transformers itself loads the output; agme reads back the same weights.
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_batch()).logits, load_model(out)(pixel_batch()))
        assert not torch.equal(reloaded(pixel_batch()).logits, load_model(trained.out_dir)(pixel_batch()))


@pytest.mark.parametrize("family", FAMILIES)
def test_output_reloads_with_identical_logits_and_runs_in_a_pipeline(hf_backdoored, family, fmnist_test, tmp_path):
    edit, held = split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=5)
    model = agme_hub.load(hf_backdoored(family).out_dir)

    result = agme_hub.clean(model, edit, trigger=TRIGGER, target=TEST_TARGET, augment_copies=1, seed=0)
    agme_hub.save(result.model, tmp_path / "out", label_names=edit.label_names)

    reloaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_batch()).logits, result.model(pixel_batch()))
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "out"), device="cpu")
    from PIL import Image

    images = [Image.fromarray(image[..., 0]).convert("RGB") for image in held.images]
    top = [answers[0]["label"] for answers in classify(images, top_k=1)]
    ours = [held.label_names[i] for i in agme_hub.engine.metrics.predict(result.model, held.images,
                                                                    result.model.preprocessor)]
    # The image processor resizes with PIL, agme with torch: a few borderline images may differ.
    assert set(top) <= set(held.label_names)
    assert np.mean([a == b for a, b in zip(top, ours)]) >= 0.9, (top, ours)


def test_cross_validation_scores_the_model_that_ships(hf_backdoored, fmnist_test):
    """On a ViT the last block's entry edit alone keeps the backdoor (the residual stream carries the trigger past
    it) and the classifier's re-fit that follows it removes it: the folds must score the two together."""
    model = hf_backdoored("vit").model
    edit, held = split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=30)
    chosen = agme_hub.clean(model, edit, trigger=TRIGGER, target=TEST_TARGET, augment_copies=2)
    row = next(r for r in chosen.selection.table if r["group"] == "entry")
    fixed = dict(trigger=TRIGGER, target=TEST_TARGET, augment_copies=2, layers=chosen.candidates.groups["entry"],
                 lam=row["lam"])
    shipped = agme_hub.clean(model, edit, **fixed)
    alone = agme_hub.clean(model, edit, refit_classifier=False, **fixed)
    asr = {name: agme_hub.evaluate(r.model, held, TRIGGER, TEST_TARGET).attack_success_rate
           for name, r in (("shipped", shipped), ("alone", alone))}
    assert asr["alone"] > 0.5 and asr["shipped"] < 0.1, asr  # the re-fit does the forgetting here
    assert abs(row["asr"] - asr["shipped"]) < 0.1, (row, asr)  # the folds saw what ships (before: ~0.98)


def test_the_folds_score_the_entry_chain_as_it_ships(hf_backdoored, fmnist_test):
    """The ViT's entry group is a chain (qkv -> proj -> fc1, each reading what the one before it gives) followed by
    the classifier's re-fit. A fold's numbers are those of the model ``clean`` ships from the other folds' images
    (exactly, without augmented copies)."""
    model = hf_backdoored("vit").model
    edit, _ = split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=30)
    entry = inspect_layers(model).groups["entry"]
    row = agme_hub.clean(model, edit, trigger=TRIGGER, target=TEST_TARGET, layers=entry, lam_grid=(0.01,),
                         augment_copies=0).selection.table[0]
    shipped = shipped_fold_scores(model, edit, TRIGGER, TEST_TARGET, entry, 0.01)
    for key, share in (("ca", 1.0), ("asr", 0.9), ("ta", 0.1)):  # one borderline image may move by float rounding
        assert abs(row[key] - shipped[key]) <= 1 / (share * len(edit)) + 1e-9, (key, row, shipped)


def test_clean_from_the_hub_push_and_load_back(hf_backdoored, hub_env, tmp_path):
    folder = hf_backdoored("vit").out_dir
    sha = hub_env.server.commit("org/vit-backdoored", {**read_folder(folder), CARD_NAME: b"---\nlicense: mit\n---\n"})

    record = run_clean("org/vit-backdoored", CleanOptions(
        data="fashion-mnist", per_class=10, eval_per_class=30, augment_copies=2, trigger=TRIGGER,
        target=str(TEST_TARGET), out=str(tmp_path / "out"), push_to="me/vit-agme"))

    assert record["revision"] == sha and record["base_model"] == "org/vit-backdoored" and record["license"] == "mit"
    assert_backdoor_removed(record)
    assert set(hub_env.server.files("me/vit-agme")) == OUTPUT_FILES | {".gitattributes"}
    card = hub_env.server.files("me/vit-agme")[CARD_NAME].decode()
    validate_card(card, base_model="org/vit-backdoored", library_name="transformers")
    assert f'pipeline("image-classification", model="{tmp_path / "out"}")' in card  # as timm's: the folder it wrote
    pushed = transformers.AutoModelForImageClassification.from_pretrained("me/vit-agme").eval()
    with torch.no_grad():
        assert torch.equal(pushed(pixel_batch()).logits, load_model(tmp_path / "out")(pixel_batch()))
    # inspect and eval work on the Hub repo and on the folder.
    info = parse_json(agme("inspect", "me/vit-agme", "--json"))
    assert info["format"] == "transformers (model_type=vit)" and info["candidate_layers"]["classifier"] == ["classifier"]
    assert info["candidate_layers"]["entry"][-1].endswith("mlp.fc1") and info["input_size"] == [3, 32, 32]
    dry = run_clean("org/vit-backdoored", CleanOptions(data="fashion-mnist", out=str(tmp_path / "dry"), dry_run=True))
    assert dry["revision"] == sha and PROCESSOR_CONFIG_NAME in dry["files"] and not (tmp_path / "dry").exists()
    assert dry["candidate_layers"] == info["candidate_layers"]
    evaluated = parse_json(agme("eval", tmp_path / "out", "--data", "fashion-mnist", "--trigger", TRIGGER,
                                "--target", "Trouser", "--json"))
    assert evaluated["metrics"]["attack_success_rate"] < 0.2


def untrained_folder(root: Path, family: str = "resnet") -> Path:
    """A transformers folder of an untrained tiny model (for tests that never look at the weights' values)."""
    from agme_hub.hub.transformers_format import create_transformers_classifier

    model = create_transformers_classifier(family, num_classes=10, img_size=32, mean=(0.5,), std=(0.25,))
    return agme_hub.save(model, root / family)


def test_repo_that_is_neither_timm_nor_transformers_gets_one_line(hub_env, tmp_path):
    weights = (untrained_folder(tmp_path) / WEIGHTS_NAME).read_bytes()
    hub_env.server.commit("org/bert", {CONFIG_NAME: json.dumps({"architectures": ["BertForMaskedLM"],
                                                                "model_type": "bert"}).encode(),
                                       WEIGHTS_NAME: weights})
    hub_env.server.commit("org/keras", {"saved_model.pb": b"\x08\x01", "README.md": b"# a Keras model\n"})

    bert = one_line_error(agme("clean", "org/bert", *CLEAN), errors.UnsupportedFormatError.exit_code)
    keras = one_line_error(agme("inspect", "org/keras"), errors.UnsupportedFormatError.exit_code)

    assert "org/bert@" in bert and "BertForMaskedLM" in bert and "not an image classifier" in bert
    assert "org/keras@" in keras and "no config.json" in keras and "neither" not in bert


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    folder = untrained_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails

    line = one_line_error(agme("eval", folder, "--data", "fashion-mnist"), errors.MissingExtraError.exit_code)

    assert 'pip install "agme[transformers]"' in line


def test_backdoor_train_cli_writes_a_transformers_folder(tmp_path):
    out = tmp_path / "resnet"
    record = parse_json(agme("backdoor-train", "--out", out, "--format", "transformers", "--arch", "resnet",
                             "--per-class", "20", "--epochs", "1", "--json"))
    assert record["output_dir"] == str(out)
    model = transformers.AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "ResNetForImageClassification" and model.config.num_labels == 10


@pytest.mark.parametrize("processor_class, kwargs", [
    ("ViTImageProcessor", {"size": {"height": 48, "width": 48}, "resample": 2}),
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 40}, "crop_pct": 0.875, "resample": 2}),
])
def test_preprocessor_follows_the_image_processor(fmnist_test, processor_class, kwargs):
    processor = getattr(transformers, processor_class)(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3],
                                                      **kwargs)
    images = np.repeat(fmnist_test.images[:8], 3, axis=-1)
    expected = processor(list(images), return_tensors="pt")["pixel_values"]

    ours = preprocessor_from_processor_config(processor.to_dict())(images)

    assert ours.shape == expected.shape
    assert (ours - expected).abs().mean() < 0.05, (ours - expected).abs().mean()


def test_batch_cleans_transformers_folders_and_resumes(hf_backdoored, tmp_path):
    from agme_hub import batch

    cheap = {"data": "fashion-mnist", "per_class": 5, "eval_per_class": 20, "lam": 0.1, "augment_copies": 1,
             "trigger": TRIGGER, "target": TEST_TARGET}
    heads = {"convnext": "classifier", "resnet": "classifier.1"}  # transformers' ResNet head is Flatten + Linear
    jobs = batch.parse_jobs({"defaults": cheap, "jobs": [
        {"source": str(hf_backdoored(family).out_dir), "name": family, "layers": [head]}
        for family, head in heads.items()]})

    summary = batch.run(jobs, out_root=tmp_path / "out", workers=1, threads_per_worker=1)
    again = batch.run(jobs, out_root=tmp_path / "out", workers=1, resume=True)

    assert summary.ok and {job.status for job in summary.jobs} == {"complete"}
    for job in summary.jobs:
        assert job.after["attack_success_rate"] < job.before["attack_success_rate"] - 0.3, (job.before, job.after)
        assert (Path(job.output_dir) / PROCESSOR_CONFIG_NAME).is_file()
    assert again.counts == {"skipped": 2}
