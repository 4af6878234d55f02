"""Proof on real data (issue 13): the repair keeps the target class where the same edit without it does not.

A backdoored ResNet trained in the test (tests/conftest.py), 10 clean images per class, trigger known;
metrics on 200 held-out test images per class. The repair (weight; the null-space constraint on the
target-class keys if the cross-validation on D chooses it; the classifier re-fit, a default, when the edit sits
upstream of the classifier) must keep TA within 2 points with the backdoor removed, while the same edit
without the repair loses more.
"""

from __future__ import annotations

import pytest

from agme_hub.data import split_edit_eval
from agme_hub.engine import clean, evaluate

from .conftest import TEST_TARGET


@pytest.fixture(scope="module")
def split(fmnist_test):
    return split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=200)


def test_repair_keeps_the_target_class(backdoored, split):
    trigger = "badnets-white-br"
    model = backdoored(trigger).model
    edit, held = split
    result = clean(model, edit, trigger=trigger, target=TEST_TARGET, seed=0, protect_grid=(None, 0.9))
    assert result.unrepaired_model is not None
    before = evaluate(model, held, trigger, TEST_TARGET)
    repaired = evaluate(result.model, held, trigger, TEST_TARGET)
    unrepaired = evaluate(result.unrepaired_model, held, trigger, TEST_TARGET)
    assert before.attack_success_rate > 0.9 and repaired.attack_success_rate < 0.03
    assert before.target_accuracy - repaired.target_accuracy <= 0.02 + 1e-9, (result.layers, result.protect, repaired)
    assert before.target_accuracy - unrepaired.target_accuracy > 0.02, unrepaired
