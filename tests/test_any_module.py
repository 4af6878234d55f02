"""Any torch module from Python: a plain torchvision ResNet (no timm, no transformers config) is cleaned.

The model is a torchvision ``ResNet`` (BasicBlock, one block per stage) really backdoored on Fashion-MNIST by
agme's own training loop; its preprocessing is given explicitly, and its candidate layers come from tracing.
"""

from __future__ import annotations

import pytest
import torch

import agme_hub
from agme_hub import errors
from agme_hub.lab.backdoor import BackdoorConfig, train_backdoored
from agme_hub.data import Preprocessor, split_edit_eval
from agme_hub.engine import inspect_layers

from .conftest import TEST_TARGET, TEST_TRAINING

TRIGGER = "badnets-white-br"
# Grey 16x16 input (a torchvision ResNet is wide: 16 px keeps its training to a minute), normalised with
# Fashion-MNIST's mean and std.
PREPROCESS = Preprocessor(input_size=(1, 16, 16), mean=(0.286,), std=(0.353,), interpolation="bilinear",
                          crop_pct=1.0, crop_mode="squash")
TRAINING = {**TEST_TRAINING, "img_size": 16, "n_train": 200, "epochs": 4, "poison_rate": 0.2}


def small_torchvision_resnet() -> torch.nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # grey images
    return model


@pytest.fixture(scope="module")
def torchvision_backdoored():
    config = BackdoorConfig(trigger=TRIGGER, target=TEST_TARGET, **TRAINING)
    return train_backdoored(config, model=small_torchvision_resnet(), preprocess=PREPROCESS)


@pytest.fixture(scope="module")
def split(fmnist_test):
    return split_edit_eval(fmnist_test, 10, seed=0, eval_per_class=50)


def test_candidates_of_a_torchvision_resnet_come_from_tracing():
    groups = inspect_layers(small_torchvision_resnet(), preprocess=PREPROCESS).groups
    assert groups == {"entry": ["layer4.0.conv1", "layer4.0.downsample.0"], "classifier": ["fc"]}


def test_layers_of_a_plain_sequential_are_the_head_and_the_map_before_it():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    assert inspect_layers(net, preprocess=PREPROCESS).groups == {"entry": ["4"], "classifier": ["6"]}


def test_torchvision_model_is_cleaned_from_python(torchvision_backdoored, split):
    model = torchvision_backdoored.model
    edit, held = split
    before = agme_hub.evaluate(model, held, TRIGGER, TEST_TARGET, preprocess=PREPROCESS)

    result = agme_hub.clean(model, edit, trigger=TRIGGER, target=TEST_TARGET, preprocess=PREPROCESS, seed=0)
    after = agme_hub.evaluate(result.model, held, TRIGGER, TEST_TARGET, preprocess=PREPROCESS)

    assert type(result.model) is type(model)  # the caller's kind of module comes back, edited
    assert set(result.model.state_dict()) == set(model.state_dict())
    assert before.attack_success_rate > 0.8, before
    assert after.attack_success_rate < 0.1, (result.layers, result.lam, after)
    assert before.clean_accuracy - after.clean_accuracy < 0.05, (before, after)
    assert result.layers and all(name in dict(model.named_modules()) for name in result.layers)


def test_layers_named_by_the_user(torchvision_backdoored, split):
    model = torchvision_backdoored.model
    edit, held = split

    result = agme_hub.clean(model, edit, trigger=TRIGGER, target=TEST_TARGET, preprocess=PREPROCESS,
                            layers=["fc"], lam=0.1, augment_copies=2)

    after = agme_hub.evaluate(result.model, held, TRIGGER, TEST_TARGET, preprocess=PREPROCESS)
    assert result.layers == ["fc"] and after.attack_success_rate < 0.3, after
    # only fc changed
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed <= {"fc.weight", "fc.bias"} and changed


def test_a_module_without_preprocessing_is_refused_in_one_line(split):
    with pytest.raises(errors.UsageError, match="preprocess=") as info:
        agme_hub.clean(small_torchvision_resnet(), split[0], trigger=TRIGGER, target=TEST_TARGET)
    assert "\n" not in str(info.value)
