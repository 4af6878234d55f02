"""Replaying only the layers after a boundary (engine/replay.py) gives what the whole network gives.

The fast path (cached boundary outputs, statistics of untouched layers reused) must leave the
cross-validation's table and the final edit as the slow path makes them, on a really backdoored model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agme_hub.data import Preprocessor, split_edit_eval
from agme_hub.engine import clean
from agme_hub.engine.layers import find_candidates
from agme_hub.engine.capture import capture_activations, get_module
from agme_hub.engine.edit import PairBatch
from agme_hub.engine.replay import CachedBoundary, deeper_boundaries, plan_replay, reads_from
from agme_hub.engine.select import capture_layer, walk_to
from agme_hub.triggers import parse_trigger
from agme_hub.lab.backdoor import create_classifier
from tests.conftest import TEST_TARGET

TRIGGER = "badnets-white-br"


@pytest.fixture(scope="module")
def resnet(backdoored):
    return backdoored(TRIGGER).model


@pytest.mark.parametrize("arch,size", [("resnet10t", 32), ("mobilenetv3_small_100", 32), ("convnext_atto", 32),
                                       ("vit_tiny_patch16_224", 32)])
def test_replay_from_the_boundary_gives_the_full_logits(arch, size, fmnist_test, resnet):
    """Every candidate group of four families: the boundary's cached output replays the model's logits."""
    torch.manual_seed(0)
    model = resnet if arch == "resnet10t" else create_classifier(
        arch, num_classes=10, in_chans=1, img_size=size, mean=(0.5,), std=(0.5,),
        model_args={"patch_size": 4} if arch.startswith("vit") else None).eval()
    preprocess = Preprocessor.from_model(model)
    sample, others = preprocess(fmnist_test.images[:4]), preprocess(fmnist_test.images[4:20])
    groups = find_candidates(model, sample).groups
    for group, layers in groups.items():
        plan = plan_replay(model, layers, sample)
        assert plan is not None, (arch, group)
        with torch.inference_mode():
            with capture_activations(model, [plan.boundary], retain_input=False, retain_output=True) as trace:
                full = trace.run(others)
            with plan.installed(model) as run:
                replayed = run(trace[plan.boundary].output)
        torch.testing.assert_close(replayed, full, rtol=1e-4, atol=1e-5)
    # the module is itself again afterwards
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_shortcut_reads_the_block_input_not_its_first_conv(resnet, fmnist_test):
    """The boundary of layer4.0's convs is layer3 (the shortcut reads it), and the shortcut's conv does not
    depend on conv1 while conv2 does."""
    sample = Preprocessor.from_model(resnet)(fmnist_test.images[:4])
    plan = plan_replay(resnet, ["layer4.0.conv2"], sample)
    assert plan is not None and plan.boundary == "layer3"
    assert not reads_from(resnet, "layer4.0.downsample.1", ["layer4.0.conv1"], sample[:1])
    assert reads_from(resnet, "layer4.0.conv2", ["layer4.0.conv1"], sample[:1])
    assert reads_from(resnet, "fc", ["layer4.0.conv2"], sample[:1])


def test_a_chain_through_blocks_walks_from_block_to_block(fmnist_test):
    """A ViT's ``blocks`` chain: a later block's layers replay from the previous block's output in the edited
    model (one block each, not every block from the group's boundary), and their statistics are the same."""
    torch.manual_seed(0)
    model = create_classifier("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, mean=(0.5,),
                              std=(0.5,), model_args={"patch_size": 4}).eval()
    preprocess = Preprocessor.from_model(model)
    images = fmnist_test.images[:12]
    triggered = parse_trigger(TRIGGER).apply(images)
    layers = find_candidates(model, preprocess(images[:4])).groups["blocks"]
    sample = preprocess(np.concatenate([images[:2], triggered[:2]]))
    plan = plan_replay(model, layers, sample)
    deeper = deeper_boundaries(model, plan, layers[1:], sample)
    assert plan.boundary == "blocks.8"
    assert {n: d.boundary for n, d in deeper.items()} == {
        **{f"blocks.10.{n}": "blocks.9" for n in ("attn.qkv", "attn.proj", "mlp.fc1")},
        **{f"blocks.11.{n}": "blocks.10" for n in ("attn.qkv", "attn.proj", "mlp.fc1")}}
    with torch.no_grad(), capture_activations(model, [plan.boundary], retain_input=False, retain_output=True,
                                              stop=True) as trace:
        trace.run(preprocess(images))
        clean_rows = trace[plan.boundary].output
        trace.run(preprocess(triggered))
        cached = CachedBoundary(plan, [clean_rows], [trace[plan.boundary].output], deeper)
    with torch.no_grad():  # the chain's first layers, edited
        for name in layers[:5]:
            weight = get_module(model, name).weight
            weight.add_(0.05 * torch.randn_like(weight))
    rows = np.array([0, 1, 2, 4, 5, 7, 8, 9, 10, 11])  # a trial's training rows
    labels = np.arange(12) % 10

    def pairs():
        for idx in np.array_split(rows, 3):
            yield PairBatch(images[idx], triggered[idx], labels[idx], idx, 0)

    walked = cached
    for name in layers[5:]:
        walked = walk_to(model, walked, name, rows, copies=0, batch_size=4)
        assert walked.plan.boundary == deeper[name].boundary
        assert torch.isnan(walked.clean[0][3]).all()  # a held-out row is not computed
        ours = capture_layer(model, name, pairs(), preprocess, TEST_TARGET, walked)
        reference = capture_layer(model, name, pairs(), preprocess, TEST_TARGET, cached)
        for field in ("cc", "cc_target", "tt", "ct"):
            torch.testing.assert_close(getattr(ours, field), getattr(reference, field), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("layers", [None, ["layer4.0.conv1", "layer4.0.downsample.1"],
                                    ["layer4.0.conv1", "layer4.0.conv2"]])
def test_clean_is_unchanged_by_replay(resnet, fmnist_test, layers):
    """Chosen groups, a shortcut beside conv1 (statistics reused) and a chain (re-captured from the cache)."""
    data, _ = split_edit_eval(fmnist_test, 5, seed=0)
    runs = [clean(resnet, data, trigger=TRIGGER, target=TEST_TARGET, seed=0, augment_copies=3, layers=layers,
                  replay=replay) for replay in (False, True)]
    slow, fast = runs
    assert fast.layers == slow.layers and fast.lam == slow.lam
    assert fast.refitted == slow.refitted and (layers is None or fast.refitted == "fc")  # the re-fit replays too
    assert [r["group"] for r in fast.selection.table] == [r["group"] for r in slow.selection.table]
    for a, b in zip(slow.selection.table, fast.selection.table):
        assert a == pytest.approx(b), (a, b)
    slow_state, fast_state = slow.model.state_dict(), fast.model.state_dict()
    for key, value in slow_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-5, atol=1e-6)
    held = fmnist_test.subset(np.arange(200, 400))
    x = Preprocessor.from_model(resnet)(held.images)
    with torch.inference_mode():
        assert torch.equal(slow.model(x).argmax(1), fast.model(x).argmax(1))


def test_a_vit_clean_is_unchanged_by_replay(fmnist_test):
    """The ViT's groups, the ``blocks`` chain among them: the trials walk from block to block and the re-fit and
    predictions replay from the deepest block reached; the table and the model are the full network's."""
    torch.manual_seed(0)
    model = create_classifier("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, mean=(0.5,),
                              std=(0.5,), model_args={"patch_size": 8, "depth": 5, "embed_dim": 48,
                                                      "num_heads": 3}).eval()
    data, _ = split_edit_eval(fmnist_test, 4, seed=0)
    blocks = find_candidates(model, Preprocessor.from_model(model)(data.images[:4])).groups["blocks"]
    slow, fast = [clean(model, data, trigger=TRIGGER, target=TEST_TARGET, seed=0, augment_copies=1, replay=replay,
                        layers=blocks) for replay in (False, True)]
    assert blocks[0] == "blocks.2.attn.qkv" and fast.layers == slow.layers == blocks and fast.lam == slow.lam
    for a, b in zip(slow.selection.table, fast.selection.table, strict=True):
        assert a == pytest.approx(b), (a, b)
    slow_state, fast_state = slow.model.state_dict(), fast.model.state_dict()
    for key, value in slow_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-5, atol=1e-6)
