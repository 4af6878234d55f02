"""Proof on real data (issue 13): the engine's default clean removes a backdoor from a real MobileNetV3.

timm ``mobilenetv3_small_100`` trained in the test with the recipe of the bench and
``benchmarks/repair_models.py`` (Fashion-MNIST, 32 px, 300 images per class, poison rate 0.1, 10 epochs, lr
0.01, seed 0), the bench's blended trigger (noise, alpha 0.1), target 1 (Trouser); 10 clean images per class,
trigger known, the engine's defaults (its cross-validation on D chooses the layers: on this model the ``neck``
chain ``conv_head`` + classifier). ASR on 100 held-out images per class, the study's split (docs/METHOD.md,
issue 13). Measured when the test was written: before CA / ASR / TA 74.7 / 88.5 / 94.0, after 74.7 / 2.6 / 83.5,
natural confusion 2.9% (200 held-out images per class); the study measured 2.4%. On stop 20's machine, trained
with one torch thread: before 78.6 / 92.3 / 97.0, after 78.3 / 1.6 / 90.0 (the neck chain at lam 0.001, chosen by
folds that solve the chain as it ships; stop 19's folds chose lam 1.0, which keeps 9.7%).

The cell that does not reach 5%, and is therefore not the one tested: the checker patch at target 0 (T-shirt).
There the edit leaves 7-9% at every setting the study tried (docs/METHOD.md, "Why the edit fails on
MobileNetV3") against a natural confusion of 4.9%: T-shirt shares its features with Shirt, so the bound would
sit within the points the model gives the target without any trigger, and the patch's residue on the neck is
not fully removed by any single or chained linear edit found so far.
"""

from __future__ import annotations

import pytest

from agme_hub.data import split_edit_eval
from agme_hub.engine import clean, evaluate, inspect_layers
from agme_hub.lab.bench import ARCHS, TRIGGERS
from tests.helpers import shipped_fold_scores

BLEND = TRIGGERS["blend"]  # the bench's blended trigger
TARGET = 1
_SPEC = ARCHS["mobilenetv3"]  # the bench's recipe: 10 epochs, lr 0.01
MOBILENET = dict(arch=_SPEC.timm_name, target=TARGET, epochs=_SPEC.epochs, lr=_SPEC.lr,
                 model_args=dict(_SPEC.model_args))


@pytest.fixture(scope="module")
def split(fmnist_test):
    return split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=100)


@pytest.fixture(scope="module")
def cleaned(backdoored, split):
    """The backdoored MobileNetV3, its default clean, and both measured on the held-out images."""
    model = backdoored(BLEND, **MOBILENET).model
    edit, held = split
    result = clean(model, edit, trigger=BLEND, target=TARGET, seed=0)
    return result, evaluate(model, held, BLEND, TARGET), evaluate(result.model, held, BLEND, TARGET)


def test_default_clean_cuts_the_backdoor_of_mobilenetv3_and_keeps_its_accuracy(cleaned):
    result, before, after = cleaned
    assert before.attack_success_rate > 0.8, before  # the backdoor took
    assert after.attack_success_rate < 0.25 * before.attack_success_rate, (result.layers, result.lam, after)
    assert before.clean_accuracy - after.clean_accuracy < 0.03, (result.layers, result.lam, after)


def test_default_clean_removes_the_backdoor_from_mobilenetv3(cleaned):
    result, _, after = cleaned
    assert after.attack_success_rate < 0.05, (result.layers, result.lam, after)


def test_the_folds_score_the_neck_chain_as_it_ships(backdoored, split):
    """The final edit solves the ``neck`` chain in order: the classifier on keys that came through the edited
    ``conv_head``. Each trial must do the same, so a fold's numbers are those of the model ``clean`` ships from the
    other folds' images (exactly, without augmented copies). Stop 19's trials edited both layers from the unedited
    keys: at lam 1.0 the folds said 2.2% ASR where the shipped chain kept 9.7%."""
    model = backdoored(BLEND, **MOBILENET).model
    edit, _ = split
    neck = inspect_layers(model).groups["neck"]
    row = clean(model, edit, trigger=BLEND, target=TARGET, layers=neck, lam_grid=(1.0,), augment_copies=0,
                seed=0).selection.table[0]
    shipped = shipped_fold_scores(model, edit, BLEND, TARGET, neck, 1.0)
    one_image = 1 / len(edit) + 1e-9  # float rounding may move one borderline image
    assert abs(row["ca"] - shipped["ca"]) <= one_image, (row, shipped)
    assert abs(row["asr"] - shipped["asr"]) <= 1 / (0.9 * len(edit)) + 1e-9, (row, shipped)
    assert abs(row["ta"] - shipped["ta"]) <= 1 / (0.1 * len(edit)) + 1e-9, (row, shipped)
