"""Proof on real data (issue 13): the engine's default clean removes a backdoor from a real MobileNetV3.

timm ``mobilenetv3_small_100`` trained in the test as the bench and ``benchmarks/repair_models.py`` train it
(Fashion-MNIST, 32 px, 300 images per class, poison rate 0.1, 10 epochs, lr 0.01), with the bench's blended
trigger (noise, alpha 0.1) and target 1 (Trouser); 10 clean images per class, trigger known, the engine's
defaults (its cross-validation on D chooses the layers: the ``neck`` chain ``conv_head`` + classifier). ASR
is measured on 200 held-out images per class.

The cell that does not reach 5%: the checker patch at target 0 (T-shirt), where the study in docs/METHOD.md
("Why the edit fails on MobileNetV3") measured 7-9% after the edit at every setting tried, against a natural
confusion of 4.9% (clean non-target images the backdoored model already sends to T-shirt): at target 0 the
bound sits within a few points of what the model does without any trigger, so the test uses target 1, whose
natural confusion is far lower, and the blended trigger, on which the study measured 1.4-2.4%.
"""

from __future__ import annotations

import pytest

from agme_hub.data import split_edit_eval
from agme_hub.engine import clean, evaluate

BLEND = "blend:alpha=0.1,image=noise,seed=0"  # the bench's blended trigger (agme_hub.lab.bench.grid.TRIGGERS)
TARGET = 1
MOBILENET = dict(arch="mobilenetv3_small_100", target=TARGET, epochs=10, lr=1e-2)  # the bench's recipe


@pytest.fixture(scope="module")
def split(fmnist_test):
    return split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=200)


def test_default_clean_removes_the_backdoor_from_mobilenetv3(backdoored, split):
    model = backdoored(BLEND, **MOBILENET).model
    edit, held = split
    result = clean(model, edit, trigger=BLEND, target=TARGET, seed=0)
    before = evaluate(model, held, BLEND, TARGET)
    after = evaluate(result.model, held, BLEND, TARGET)
    assert before.attack_success_rate > 0.8, before  # the backdoor took
    assert after.attack_success_rate < 0.05, (result.layers, result.lam, after)
    assert before.clean_accuracy - after.clean_accuracy < 0.03, (result.layers, result.lam, after)
