"""Proof on real data: backdoored models trained in the test lose their backdoor, and keep their accuracy.

Bounds from the engine issue: with 10 clean images per class in BDK mode, ASR from > 90% to < 3%, CA drop
< 1.5 points, TA drop < 5 points. Metrics are measured on 200 held-out test images per class.
"""

from __future__ import annotations

import pytest

from agme_hub.data import split_edit_eval
from agme_hub.engine.clean import clean, evaluate

from .conftest import TEST_TARGET


@pytest.fixture(scope="module")
def split(fmnist_test):
    return split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=200)


def _before_after(model, result, held, trigger):
    before = evaluate(model, held, trigger, TEST_TARGET)
    after = evaluate(result.model, held, trigger, TEST_TARGET)
    return before, after


@pytest.mark.parametrize("trigger", ["badnets-white-br", "blend:alpha=0.15"])
def test_bdk_removes_the_backdoor(backdoored, split, trigger):
    model = backdoored(trigger).model
    edit, held = split
    result = clean(model, edit, trigger=trigger, target=TEST_TARGET, seed=0)
    before, after = _before_after(model, result, held, trigger)
    assert before.attack_success_rate > 0.9
    assert after.attack_success_rate < 0.03, (result.layers, result.lam, after)
    assert before.clean_accuracy - after.clean_accuracy < 0.015
    assert before.target_accuracy - after.target_accuracy < 0.05
    assert result.mode == "bdk" and result.selection is not None


def test_bdk_without_target_finds_it_from_the_trigger(backdoored, split):
    model = backdoored("badnets-white-br").model
    result = clean(model, split[0], trigger="badnets-white-br", lam=0.01, layers=["fc"], augment_copies=2)
    assert result.target == TEST_TARGET and result.target_detected


def test_no_bdk_with_target_given(backdoored, no_bdk_cleaned, split):
    model = backdoored("badnets-white-br").model
    _, held = split
    result = no_bdk_cleaned("badnets-white-br")  # clean(model, split[0], target=TEST_TARGET, seed=0), shared
    assert result.mode == "no-bdk" and result.trigger_kind == "surrogate"
    _, after = _before_after(model, result, held, "badnets-white-br")  # measured with the real trigger
    assert after.attack_success_rate < 0.05


def test_convnext_bdk_bound(backdoored, split):
    """No BatchNorm, a residual stream: the cross-validation's choice passes, and so does the entry of the last stage.

    The two groups score within one held-out image of each other here, so which one the folds prefer is not
    the claim (it moved to the classifier when the trials began to include the classifier's re-fit).
    """
    trigger = "blend:alpha=0.15"
    model = backdoored(trigger, arch="convnext_atto").model
    edit, held = split
    chosen = clean(model, edit, trigger=trigger, target=TEST_TARGET, seed=0, gamma=3.0)
    entry = clean(model, edit, trigger=trigger, target=TEST_TARGET, seed=0, gamma=3.0,
                  layers=["stages.3.downsample.1"], lam=chosen.lam)
    for result in (chosen, entry):
        before, after = _before_after(model, result, held, trigger)
        assert before.attack_success_rate > 0.9
        assert after.attack_success_rate < 0.03, (result.layers, result.lam, after)
        assert before.clean_accuracy - after.clean_accuracy < 0.015, (result.layers, after)
        assert before.target_accuracy - after.target_accuracy < 0.05, (result.layers, after)


def test_clean_model_keeps_its_accuracy(backdoored, split):
    model = backdoored("badnets-white-br", poison_rate=0.0).model
    edit, held = split
    result = clean(model, edit, trigger="patch:size=3,pos=top-left,fill=noise,seed=7", target=TEST_TARGET, seed=0)
    before, after = _before_after(model, result, held, None)
    assert before.clean_accuracy - after.clean_accuracy < 0.01
