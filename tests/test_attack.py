"""Backdoored models are really trained on real data, and saved in a folder timm reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from agme_hub.lab.backdoor import BACKDOOR_NAME, BackdoorConfig, poison, train_backdoored
from agme_hub.hub.checkpoint import load_model
from agme_hub.data import Preprocessor
from agme_hub.errors import ClassMismatchError, TriggerSpecError

from .helpers import write_png


@pytest.mark.parametrize("trigger", ["badnets-white-br", "blend:alpha=0.15"])
def test_backdoor_takes(backdoored, trigger):
    result = backdoored(trigger)
    assert result.metrics.attack_success_rate > 0.9
    assert result.metrics.clean_accuracy > 0.7


def test_image_trigger_backdoor_takes(backdoored, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pattern")
    rng = np.random.default_rng(5)
    pattern = write_png(folder / "pattern.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    mask = np.zeros((28, 28), np.uint8)
    mask[2:8, 20:26] = 200  # a semi-transparent 6x6 sticker
    mask_path = write_png(folder / "mask.png", mask)
    result = backdoored(f"image:pattern={pattern},mask={mask_path}")
    assert result.metrics.attack_success_rate > 0.9


def test_poison_relabels_only_the_chosen(fmnist_test):
    data = fmnist_test.subset(np.arange(500))
    poisoned, chosen = poison(data, "badnets-white-br", 1, 0.1, seed=0)
    assert len(chosen) == 50 and (data.labels[chosen] != 1).all()
    assert (poisoned.labels[chosen] == 1).all()
    untouched = np.setdiff1d(np.arange(500), chosen)
    assert np.array_equal(poisoned.images[untouched], data.images[untouched])
    assert (poisoned.images[chosen, -3:, -3:] == 255).all()


def test_saved_folder_reloads_in_timm_with_identical_outputs(backdoored, fmnist_test):
    result = backdoored("badnets-white-br")
    folder = result.out_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["crop_pct"] == 1.0 and config["label_names"][0] == "T-shirt/top"
    assert json.loads((folder / BACKDOOR_NAME).read_text())["trigger"].startswith("patch:")
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    via_agme = load_model(folder)
    x = Preprocessor.from_model(via_timm)(fmnist_test.images[:8])
    with torch.inference_mode():
        expected = result.model.eval()(x)
        assert torch.equal(via_timm(x), expected) and torch.equal(via_agme(x), expected)
    assert via_timm.pretrained_cfg["label_names"][1] == "Trouser"


def test_bad_training_input():
    with pytest.raises(ClassMismatchError, match="out of range"):
        train_backdoored(BackdoorConfig(target=12, n_train=2))
    with pytest.raises(TriggerSpecError):
        train_backdoored(BackdoorConfig(trigger="patch:size=big", n_train=2))


def test_backdoor_train_command(tmp_path):
    from cli import app

    out = tmp_path / "model"
    args = ["backdoor-train", "--out", str(out), "--arch", "resnet10t", "--per-class", "20", "--epochs", "1",
            "--target", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert 0 <= record["metrics"]["clean_accuracy"] <= 1 and (out / "model.safetensors").is_file()
    again = CliRunner().invoke(app, args)  # the folder exists: refused without --yes
    assert again.exit_code != 0 and "exists" in again.output and "Traceback" not in again.output
    bad = CliRunner().invoke(app, ["backdoor-train", "--out", str(tmp_path / "x"), "--target", "10"])
    assert bad.exit_code == ClassMismatchError.exit_code and "out of range" in bad.output
