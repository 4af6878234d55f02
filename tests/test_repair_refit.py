"""The repair's second pass on the classifier (engine/repair.py, issue 13): mechanics on real images, no training.

A seeded random tiny ResNet and 3 classes of real Fashion-MNIST images: with nothing to undo the re-fit keeps the
classifier; after an edit of the last stage's entry only the classifier is re-fitted, the unrepaired twin keeps the
original one; an edit of the classifier itself, or a run without repair, is not re-fitted. Whether it helps the target class is measured in docs/METHOD.md.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from agme_hub.constants import UNDERDETERMINED_REFIT_LAM
from agme_hub.data import ImageSet, Preprocessor, balanced_indices
from agme_hub.engine import clean, inspect_layers
from agme_hub.engine.edit import augmented_pairs
from agme_hub.engine.layers import editable_layer
from agme_hub.engine.repair import RefitStats, collect_refit_stats, refit_ridge, solve_refit
from agme_hub.hub.checkpoint import load_model

from .helpers import save_tiny_model

TRIGGER = "badnets-white-br"


@pytest.fixture(scope="module")
def setting(fmnist_test, tmp_path_factory):
    model = load_model(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))
    keep = balanced_indices(fmnist_test.labels, 8, seed=1)
    keep = keep[fmnist_test.labels[keep] < 3]
    data = ImageSet(fmnist_test.images[keep], fmnist_test.labels[keep], ["a", "b", "c"], "three classes")
    return model, data


class _NoTrigger:
    applies_to_any_image = True  # a stamp-like trigger to augmented_pairs

    def apply(self, images: np.ndarray) -> np.ndarray:
        return images


def test_refit_of_an_unedited_model_keeps_the_classifier(setting):
    # Real captured sums: with nothing edited and triggered twins equal to the clean images, W0 is the solution.
    model, data = setting
    pairs = augmented_pairs(data.images, data.labels, _NoTrigger(), copies=2, seed=0)
    stats = collect_refit_stats(copy.deepcopy(model), model, "fc", pairs, Preprocessor.from_model(model), target=0)
    w0 = editable_layer(model, "fc").weight_matrix()
    assert torch.allclose(solve_refit(w0, w0, stats, lam=0.01, gamma=1.0, target_weight=4.0), w0, atol=1e-8)


def test_refit_rewrites_only_the_classifier_and_not_the_unrepaired_twin(setting):
    model, data = setting
    entry = inspect_layers(model).groups["entry"]
    plain = clean(model, data, trigger=TRIGGER, target=0, layers=entry, lam=0.1, refit_classifier=False)
    refitted = clean(model, data, trigger=TRIGGER, target=0, layers=entry, lam=0.1)  # the re-fit is the default
    assert plain.refitted is None and refitted.refitted == "fc"
    before, after, unrepaired = (dict(m.named_parameters()) for m in (model, refitted.model, refitted.unrepaired_model))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {"fc.weight", "fc.bias"} <= changed and all(n.startswith(("fc.", *entry)) for n in changed)
    assert torch.equal(unrepaired["fc.weight"], before["fc.weight"])  # no repair: the classifier as it was
    assert not torch.equal(unrepaired["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
    # the entry edit is the same with and without the re-fit: it comes after
    assert torch.equal(dict(plain.model.named_parameters())["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])


def test_classifier_edit_is_not_refitted(setting):
    model, data = setting
    head = inspect_layers(model).groups["classifier"]
    assert clean(model, data, trigger=TRIGGER, target=0, layers=head, lam=0.1, refit_classifier=True).refitted is None
    assert clean(model, data, trigger=TRIGGER, target=0, layers=inspect_layers(model).groups["entry"], lam=0.1,
                 refit_classifier=True, repair=False).refitted is None  # the re-fit is part of the repair


def test_refit_with_unchanged_keys_is_the_identity():
    # Keys the edit did not change (k' = k0) and triggered twins equal to the clean images: W0 is the solution.
    rng = np.random.default_rng(0)
    k = torch.as_tensor(rng.normal(size=(50, 6)))
    w0 = torch.as_tensor(rng.normal(size=(3, 6)))
    gram = k.T @ k
    stats = RefitStats(cc=gram, cc_target=gram[:0, :0].new_zeros(6, 6), oc=gram, oc_target=gram.new_zeros(6, 6),
                       tt=gram, ot=gram)
    assert torch.allclose(solve_refit(w0, w0, stats, lam=0.01, gamma=1.0), w0)


def test_an_underdetermined_refit_gets_the_larger_ridge():
    """Fewer rows (D and its copies) than classifier keys: the re-fit would interpolate them at the small ridge
    (the pretrained Lite0 of tests/test_pretrained.py lost 23 pt of clean accuracy); a larger ridge stands."""
    assert refit_ridge(0.001, key_dim=513, rows=1000) == 0.001
    assert refit_ridge(0.001, key_dim=1281, rows=1000) == UNDERDETERMINED_REFIT_LAM == 0.1
    assert refit_ridge(0.5, key_dim=1281, rows=1000) == 0.5  # a larger ridge asked for is kept
