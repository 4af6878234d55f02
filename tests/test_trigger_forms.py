"""Trigger knowledge in the forms users have: triggered twins in a folder (``--triggered-data``) and the user's
own function (``--trigger python:pkg.module:function``, ``trigger=function``).

Real backdoored models (the session's ``backdoored`` fixture: a small ResNet on Fashion-MNIST) are cleaned
with each form and their attack success falls; bad inputs end in one line, their own exit code, nothing written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import agme_hub
from agme_hub import errors
from agme_hub.constants import CARD_NAME, DEFAULT_SURROGATE_WARP_PX, REPORT_NAME
from agme_hub.data import load_images, load_paired_folders, split_edit_eval
from agme_hub.engine.edit import augmented_pairs
from agme_hub.lab.warps import make_warp, wanet_warp
from agme_hub.trigger_forms import CallableTrigger, PairedTrigger
from agme_hub.triggers import parse_trigger
from cli import app
from tests.conftest import TEST_TARGET
from tests.helpers import save_tiny_model, write_image_folder, write_png

runner = CliRunner()
WARP = "python:agme_hub.lab.warps:wanet_warp"


def agme(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int) -> str:
    """Failed with ``code``: one ``error:`` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, repr(result.exception))
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def fmnist_pairs(folder: Path, trigger: str, per_class: int, classes: range, names: list[str]) -> tuple[Path, Path]:
    """Real Fashion-MNIST test images in class folders, and their twins stamped with ``trigger`` (same names)."""
    data = load_images("fashion-mnist")
    keep = np.concatenate([np.flatnonzero(data.labels == c)[:per_class] for c in classes])
    images, labels = data.images[keep], data.labels[keep]
    clean = write_image_folder(folder / "clean", images, labels, names)
    twins = write_image_folder(folder / "triggered", parse_trigger(trigger).apply(images), labels, names)
    return clean, twins


# the callable form
def test_callable_trigger_by_name_and_by_function():
    images = load_images("fashion-mnist").images[:8]
    before = images.copy()
    named = parse_trigger(WARP)
    given = parse_trigger(wanet_warp)
    assert isinstance(named, CallableTrigger) and named.spec == WARP
    assert given.spec == WARP and parse_trigger(given.spec).function is wanet_warp  # the spec reproduces it
    warped = named.apply(images)
    assert warped.dtype == np.uint8 and warped.shape == images.shape and np.array_equal(images, before)
    assert np.array_equal(warped, given.apply(images)) and np.array_equal(warped[0], named.apply(images[0]))
    assert np.abs(warped.astype(int) - images).mean() > 5  # it moves pixels
    assert not np.array_equal(make_warp(seed=1)(images), warped)  # seeded: another seed is another warp


def test_a_function_runs_only_when_named_with_the_prefix(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "sideeffect_trigger.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef fn(x):\n    return x\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.TriggerSpecError, match="python:sideeffect_trigger:fn"):
        parse_trigger("sideeffect_trigger:fn")
    assert not marker.exists()
    for spec in ("patch:size=3,pos=bottom-right", "badnets-white-br", "blend:alpha=0.1"):
        assert not isinstance(parse_trigger(spec), CallableTrigger)
    assert isinstance(parse_trigger("python:sideeffect_trigger:fn"), CallableTrigger)  # found in the current folder
    assert marker.exists()
    monkeypatch.delitem(sys.modules, "sideeffect_trigger")


BAD_FUNCTIONS = {
    "module missing": ("python:no_such_trigger_module:fn", "cannot import"),
    "attribute missing": ("python:bad_triggers:nothing", "has no 'nothing'"),
    "not callable": ("python:bad_triggers:NUMBER", "not a function"),
    "import fails": ("python:broken_trigger_module:fn", "ZeroDivisionError"),
    "raises": ("python:bad_triggers:raises", "raised ValueError: no luck"),
    "wrong shape": ("python:bad_triggers:crop", "must return uint8 images of shape"),
    "wrong dtype": ("python:bad_triggers:floats", "got float32"),
    "not an array": ("python:bad_triggers:listed", "got list"),
    "not a reference": ("python:bad triggers", "write python:pkg.module:function"),
}


@pytest.fixture
def bad_functions(tmp_path, monkeypatch):
    (tmp_path / "bad_triggers.py").write_text(
        "import numpy as np\nNUMBER = 3\n"
        "def raises(x):\n    raise ValueError('no luck')\n"
        "def crop(x):\n    return x[:, 1:]\n"
        "def floats(x):\n    return x.astype(np.float32)\n"
        "def listed(x):\n    return list(x)\n")
    (tmp_path / "broken_trigger_module.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("bad_triggers", "broken_trigger_module"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("case", list(BAD_FUNCTIONS))
def test_bad_function_is_one_line_exit_9_and_writes_nothing(case, bad_functions, tmp_path):
    spec, message = BAD_FUNCTIONS[case]
    data = tmp_path / "d.npz"
    fm = load_images("fashion-mnist")
    np.savez(data, x=fm.images[:60], y=np.arange(60) % 3)
    model = save_tiny_model(tmp_path / "tiny")

    line = one_line_error(agme("clean", model, "--data", data, "--trigger", spec, "--target", "0", "--per-class", "5",
                               "--lam", "0.1", "--layers", "fc", "--out", tmp_path / "out"),
                          errors.TriggerCallableError.exit_code)

    assert message in line
    assert not (tmp_path / "out").exists()


# the paired form
def test_paired_trigger_gives_the_twin_of_each_given_image_only():
    images = load_images("fashion-mnist").images[:20]
    twins = 255 - images
    paired = PairedTrigger.from_pairs(images, twins, source="inverted")
    order = np.array([5, 0, 19, 5])
    assert np.array_equal(paired.apply(images[order]), twins[order])
    assert np.array_equal(paired.apply(images[3]), twins[3])
    with pytest.raises(errors.PairedDataError, match="1 of 2 images have no triggered twin in inverted"):
        paired.apply(np.stack([images[0], images[0] // 2]))
    assert paired.spec == "paired:inverted,pairs=20"


def test_augmented_copies_move_a_clean_image_and_its_twin_alike():
    data = load_images("fashion-mnist").subset(np.arange(40))
    twins = 255 - data.images  # an inversion commutes with shifts and flips: the twins must stay inversions
    paired = PairedTrigger.from_pairs(data.images, twins)
    batches = list(augmented_pairs(data.images, data.labels, paired, copies=3, seed=4, flip=True, noise=0.0))
    assert len(batches) == 4
    for batch in batches:
        assert np.array_equal(batch.triggered, 255 - batch.clean)
    assert not np.array_equal(batches[1].clean, data.images)  # the copies are augmented
    # the clean images of the copies are those a stamped trigger gets: the seeded augmentation is unchanged
    stamped = list(augmented_pairs(data.images, data.labels, parse_trigger("badnets-white-br"), copies=3, seed=4))
    noisy = list(augmented_pairs(data.images, data.labels, paired, copies=3, seed=4))
    assert all(np.array_equal(a.clean, b.clean) for a, b in zip(stamped, noisy))


NAMES = ["a", "b", "c"]


@pytest.fixture
def pair_folders(tmp_path):
    fm = load_images("fashion-mnist")
    images, labels = fm.images[:30], np.arange(30) % 3
    clean = write_image_folder(tmp_path / "clean", images, labels, NAMES)
    twins = write_image_folder(tmp_path / "twins", 255 - images, labels, NAMES)
    return clean, twins


def test_paired_folders_load_aligned_and_a_jpeg_may_pair_with_a_png(pair_folders):
    clean, twins = pair_folders
    (clean / "a" / "00000.png").rename(clean / "a" / "00000.bmp")  # another suffix, the same name
    data, triggered = load_paired_folders(clean, twins, label_names=NAMES)
    assert len(data) == 30 and triggered.shape == data.images.shape
    assert np.array_equal(triggered, 255 - data.images)


def _break(case: str, clean: Path, twins: Path) -> None:
    if case == "missing twin":
        (twins / "b" / "00001.png").unlink()
    elif case == "extra twin":
        write_png(twins / "c" / "99999.png", np.zeros((28, 28), np.uint8))
    elif case == "other size":
        write_png(twins / "a" / "00003.png", np.zeros((32, 32), np.uint8))
    elif case == "two twins of one name":
        write_png(twins / "a" / "00003.jpg", np.zeros((28, 28), np.uint8))
    elif case == "not a folder":
        shutil.rmtree(twins)
        twins.write_text("not images")
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing twin", "extra twin", "other size", "two twins of one name",
                                  "not a folder"])
def test_unpaired_folder_is_one_line_exit_8_and_writes_nothing(case, pair_folders, tmp_path):
    clean, twins = pair_folders
    _break(case, clean, twins)
    model = save_tiny_model(tmp_path / "tiny")

    line = one_line_error(agme("clean", model, "--data", clean, "--triggered-data", twins, "--target", "0",
                               "--per-class", "5", "--lam", "0.1", "--layers", "fc", "--out", tmp_path / "out"),
                          errors.PairedDataError.exit_code)

    assert not (tmp_path / "out").exists()
    expected = {"missing twin": "00001.png has no twin", "extra twin": "99999.png has no clean twin",
                "other size": "is 32x32x1", "two twins of one name": "are both the twin",
                "not a folder": "not a folder"}
    assert expected[case] in line


def test_triggered_data_refuses_a_second_trigger_and_eval_data(pair_folders, tmp_path):
    clean, twins = pair_folders
    with pytest.raises(errors.UsageError, match="not both"):
        agme_hub.CleanOptions(data=str(clean), triggered_data=str(twins), trigger="badnets-white-br")
    with pytest.raises(errors.UsageError, match="held-out pairs"):
        agme_hub.CleanOptions(data=str(clean), triggered_data=str(twins), eval_data=str(clean))


# real backdoored models: the attack success falls with each form
def test_pairs_without_augmentation_edit_exactly_as_the_stamped_trigger(backdoored):
    """With no augmented copy the twins are the stamps: the same statistics, the same edited weights."""
    import torch

    result = backdoored("badnets-white-br")
    data = load_images("fashion-mnist")
    edit = data.subset(np.flatnonzero(data.labels < 10)[:100])
    paired = PairedTrigger.from_pairs(edit.images, parse_trigger("badnets-white-br").apply(edit.images))
    settings = dict(target=TEST_TARGET, augment_copies=0, lam=0.1, layers=["fc"])
    by_pairs = agme_hub.clean(result.model, edit, trigger=paired, **settings).model
    by_spec = agme_hub.clean(result.model, edit, trigger="badnets-white-br", **settings).model
    assert torch.equal(by_pairs.fc.weight, by_spec.fc.weight)
    assert not torch.equal(by_pairs.fc.weight, result.model.fc.weight)


def test_triggered_data_cleans_like_the_trigger_spec(backdoored, tmp_path):
    trigger = "badnets-white-br"
    model_dir = backdoored(trigger).out_dir
    # Class 0's name, "T-shirt/top", cannot name a folder: its images are left out (the target is class 1).
    names = load_images("fashion-mnist").label_names
    clean, twins = fmnist_pairs(tmp_path, trigger, per_class=40, classes=range(1, 10), names=names)
    common = ["--data", clean, "--per-class", "10", "--target", TEST_TARGET, "--json"]

    paired = json.loads(agme("clean", model_dir, *common, "--triggered-data", twins, "--out", tmp_path / "p").stdout)
    spec = json.loads(agme("clean", model_dir, *common, "--trigger", trigger, "--out", tmp_path / "s").stdout)

    assert paired["before"]["attack_success_rate"] == spec["before"]["attack_success_rate"] > 0.9
    assert paired["after"]["attack_success_rate"] < 0.1
    assert paired["after"]["attack_success_rate"] <= spec["after"]["attack_success_rate"] + 0.03
    assert paired["after"]["clean_accuracy"] > paired["before"]["clean_accuracy"] - 0.05
    assert paired["mode"] == "bdk" and paired["trigger"]["spec"].startswith("paired:")
    assert "held-out" in paired["asr_measured_with"] and "--triggered-data" in paired["command"]
    assert "triggered twins of the held-out images" in (tmp_path / "p" / CARD_NAME).read_text()


def test_warp_given_as_a_function_is_removed(backdoored, tmp_path):
    """A WaNet-style warp (nothing pasted: no pattern or mask describes it), planted and removed by name."""
    result = backdoored(WARP)
    assert result.metrics.attack_success_rate > 0.9
    data = tmp_path / "fm.npz"
    fm = load_images("fashion-mnist")
    keep = np.concatenate([np.flatnonzero(fm.labels == c)[:40] for c in range(10)])
    np.savez(data, x=fm.images[keep], y=fm.labels[keep])

    record = json.loads(agme("clean", result.out_dir, "--data", data, "--per-class", "10", "--trigger", WARP,
                             "--target", TEST_TARGET, "--json", "--out", tmp_path / "out").stdout)

    # Measured: 94% -> 11% with 10 images per class (a warp is not fully removed yet; the bench's "warp" rows
    # track it), so the claim here is that most of the backdoor goes.
    assert record["before"]["attack_success_rate"] > 0.9
    assert record["after"]["attack_success_rate"] < record["before"]["attack_success_rate"] / 4
    assert record["after"]["clean_accuracy"] > record["before"]["clean_accuracy"] - 0.05
    assert record["trigger"]["spec"] == WARP and WARP in record["command"]
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["trigger"]["spec"] == WARP
    # the Python API takes the function itself
    held_out = fm.subset(np.setdiff1d(np.flatnonzero(fm.labels < 10)[:1000], keep))
    edited = agme_hub.clean(result.model, fm.subset(keep[::4]), trigger=wanet_warp, target=TEST_TARGET)
    assert edited.trigger.spec == WARP
    before = agme_hub.evaluate(result.model, held_out, trigger=wanet_warp, target=TEST_TARGET).attack_success_rate
    after = agme_hub.evaluate(edited.model, held_out, trigger=wanet_warp, target=TEST_TARGET).attack_success_rate
    assert after < before / 4


def test_no_bdk_forgets_most_of_a_warp_it_was_never_given(backdoored, fmnist_test):
    """Trigger unknown, target given: random warps reach the target, so a warp surrogate (a smooth field of at most
    2 px) is made, and forgetting it with fresh warps of its size removes more of the real warp than the mask and
    additive surrogates alone (the comparison)."""
    model = backdoored(WARP).model
    edit, held = split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=100)
    cleaned = agme_hub.clean(model, edit, target=TEST_TARGET, seed=0)
    warp = {s.kind: s for s in cleaned.surrogates}["warp"]
    assert cleaned.warp_evidence is not None and cleaned.warp_evidence.found
    assert warp.success > 0.9 and warp.size <= DEFAULT_SURROGATE_WARP_PX + 1e-5
    assert cleaned.selection is not None and cleaned.selection.forget.endswith("+warp+random-warp")
    without = agme_hub.clean(model, edit, target=TEST_TARGET, seed=0, surrogates=("patch", "full"))

    def asr(m) -> float:
        return agme_hub.evaluate(m, held, trigger=wanet_warp, target=TEST_TARGET).attack_success_rate

    before, after, after_without = asr(model), asr(cleaned.model), asr(without.model)
    # Measured: 90.8% -> 30.8% (50.4% without the warp surrogate): a warp is not removed as a patch is (the bench's
    # "warp" rows track it), so the claim is that the warp surrogate takes away the larger part.
    assert before > 0.9 and after < before / 2 and after < after_without - 0.1, (before, after, after_without)
    clean_before = agme_hub.evaluate(model, held).clean_accuracy
    assert agme_hub.evaluate(cleaned.model, held).clean_accuracy > clean_before - 0.03
