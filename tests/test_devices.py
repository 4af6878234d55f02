"""Devices, batch sizes, wide layers and progress (issue 14, items 1, 5 and 6), on the CPU.

The edit is the same wherever and in whatever batches it runs (statistics are float64 sums); a device that
is not there is one DeviceError before anything runs; keys wider than ``constants.MAX_KEY_DIM`` get a
blockwise solve instead of a refusal; the engine reports each stage's counts. ``tests/test_gpu.py`` checks
the CUDA side where a GPU exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import agme_hub
from agme_hub import constants
from agme_hub.data import balanced_indices
from agme_hub.devices import auto_batch_size, pick_batch_size, resolve_device
from agme_hub.engine.edit import GramStats, solve_edit
from agme_hub.engine.layers import editable_layer, key_block
from agme_hub.errors import DeviceError, UnsupportedArchitectureError, UsageError
from agme_hub.options import CleanOptions
from agme_hub.progress import STAGES
from tests.conftest import TEST_TARGET

TRIGGER = "badnets-white-br"


@pytest.fixture(scope="module")
def model_and_data(backdoored, fmnist_test):
    result = backdoored(TRIGGER)
    edit = fmnist_test.subset(balanced_indices(fmnist_test.labels, 5, seed=0))
    held = fmnist_test.subset(balanced_indices(fmnist_test.labels, 40, seed=1)[5 * 10:])
    return result.model, edit, held


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())


# ---------------------------------------------------------------------------------------------- device specs
def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "mps"])
def test_a_missing_device_is_a_device_error(spec, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=f"--device {spec}: this machine has no"):
        resolve_device(spec)
    assert DeviceError.exit_code == 17


def test_a_cuda_index_past_the_last_device_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("spec", ["tpu", "cuda:", "cuda:x", "gpu", ""])
def test_an_unknown_spec_is_a_device_error_also_in_the_options(spec):
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device(spec)
    with pytest.raises(DeviceError, match="unknown device"):
        CleanOptions(data="mnist", device=spec)


def test_batch_sizes_follow_the_device_and_the_input_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_batch_size(cpu, (1, 32, 32)) == 512  # small images: 256 pairs per pass, as before devices
    assert 8 <= auto_batch_size(cpu, (3, 224, 224)) <= 32  # a 224-px ResNet-50's activations stay a few GB
    assert auto_batch_size(cuda, (3, 224, 224)) > auto_batch_size(cpu, (3, 224, 224))
    assert auto_batch_size(cpu, (3, 4096, 4096)) == 2  # never below one pair
    assert pick_batch_size(7, cpu, (1, 32, 32)) == 7
    for bad in (1, 0, True, 2.5):
        with pytest.raises(UsageError, match="--batch-size"):
            pick_batch_size(bad, cpu, (1, 32, 32))
    with pytest.raises(UsageError, match="--batch-size"):
        CleanOptions(data="mnist", batch_size=1)


# ---------------------------------------------------------------------------------------------- the engine
def test_device_cpu_and_any_batch_size_give_the_same_edit(model_and_data):
    model, edit, held = model_and_data
    kwargs = dict(trigger=TRIGGER, target=TEST_TARGET, augment_copies=1)
    default = agme_hub.clean(model, edit, **kwargs)
    on_cpu = agme_hub.clean(model, edit, device="cpu", **kwargs)
    small = agme_hub.clean(model, edit, device="cpu", batch_size=6, **kwargs)  # 3 pairs per pass, odd folds
    assert (default.device, default.batch_size, small.batch_size) == ("cpu", 512, 6)
    assert _max_diff(default.model, on_cpu.model) == 0.0  # the same path, bit for bit
    assert (small.layers, small.lam) == (default.layers, default.lam)
    assert [r["score"] for r in small.selection.table] == [r["score"] for r in default.selection.table]
    assert _max_diff(default.model, small.model) < 1e-5
    before = agme_hub.evaluate(model, held, TRIGGER, TEST_TARGET)
    after = agme_hub.evaluate(small.model, held, TRIGGER, TEST_TARGET, device="cpu", batch_size=5)
    assert after == agme_hub.evaluate(small.model, held, TRIGGER, TEST_TARGET)
    assert before.attack_success_rate > 0.9 and after.attack_success_rate < 0.2  # it is a real edit


# ---------------------------------------------------------------------------------------------- wide layers
def test_blockwise_solve_is_the_full_solve_when_blocks_do_not_interact():
    """Keys living in one block each make every Gram matrix block-diagonal: then the blockwise solve (with the
    layer's ridge, zero padding of the last block included) is the closed form itself."""
    generator = torch.Generator().manual_seed(0)
    dim, block = 12, 5  # blocks of 5, 5 and 2 (+3 zero keys)
    full, blocked = GramStats.zeros(dim), GramStats.zeros(dim, block=block)
    assert blocked.cc.shape == (3, 5, 5)
    for i in range(60):
        lo, hi = (i % 3) * block, min(dim, (i % 3) * block + block)
        kc = torch.zeros(4, dim, dtype=torch.float64)
        kt = torch.zeros(4, dim, dtype=torch.float64)
        kc[:, lo:hi] = torch.randn(4, hi - lo, generator=generator, dtype=torch.float64)
        kt[:, lo:hi] = kc[:, lo:hi] + 0.5 * torch.randn(4, hi - lo, generator=generator, dtype=torch.float64)
        is_target = torch.tensor([True, False, False, i % 2 == 0])
        full.add(kc, kt, is_target)
        blocked.add(kc, kt, is_target)
    w0 = torch.randn(7, dim, generator=generator, dtype=torch.float64)
    exact = solve_edit(w0, full, lam=0.1, gamma=1.0, target_weight=4.0)
    assert torch.allclose(solve_edit(w0, blocked, lam=0.1, gamma=1.0, target_weight=4.0), exact, atol=1e-12)
    left_out = (blocked - blocked) + blocked  # the cross-validation's arithmetic keeps the blocks
    assert left_out.block == block and torch.equal(left_out.cc, blocked.cc)


def test_a_layer_wider_than_the_cap_is_edited_blockwise(model_and_data, monkeypatch):
    model, edit, held = model_and_data
    width = editable_layer(model, "fc").key_dim  # 129: 128 features and the bias
    monkeypatch.setattr(constants, "MAX_KEY_DIM", 64)
    monkeypatch.setattr(constants, "MIN_KEY_BLOCK", 16)
    assert key_block(width) == 64 * 64 // width == 31  # 5 blocks: the memory of a 64-wide layer
    result = agme_hub.clean(model, edit, trigger=TRIGGER, target=TEST_TARGET, layers=["fc"], lam=0.1,
                            augment_copies=1)
    before = agme_hub.evaluate(model, held, TRIGGER, TEST_TARGET)
    after = agme_hub.evaluate(result.model, held, TRIGGER, TEST_TARGET)
    assert before.attack_success_rate > 0.9
    assert after.attack_success_rate < 0.5 * before.attack_success_rate
    assert after.clean_accuracy > before.clean_accuracy - 0.15


def test_a_layer_too_wide_even_blockwise_is_refused_naming_layers_that_fit(model_and_data, monkeypatch):
    model, _, _ = model_and_data
    monkeypatch.setattr(constants, "MAX_KEY_DIM", 16)
    monkeypatch.setattr(constants, "MIN_KEY_BLOCK", 4)  # the widest key: 16 * 16 / 4 = 64 < 129
    with pytest.raises(UnsupportedArchitectureError, match=r"layer fc reads 129 values per key.*layers that fit: "):
        editable_layer(model, "fc")


# ---------------------------------------------------------------------------------------------- progress
def test_every_stage_reports_counts_up_to_its_total(model_and_data):
    model, edit, held = model_and_data
    events = []
    agme_hub.clean(model, edit, target=TEST_TARGET, augment_copies=1, inversion_steps=4, surrogates=("patch",),
                   progress=events.append)  # one surrogate: one inversion; it and its region: two capture passes
    agme_hub.evaluate(model, held, TRIGGER, TEST_TARGET, progress=events.append)
    seen = {e.stage for e in events}
    assert seen == set(STAGES)
    for stage in STAGES:
        mine = [e for e in events if e.stage == stage]
        assert mine[0].done == 0 and mine[-1].done == mine[-1].total > 0, stage
        assert all(b.done >= a.done or b.done == 0 for a, b in zip(mine, mine[1:])), stage
    last = {e.stage: e for e in events}
    assert last["inversion"].total == 4 and last["inversion"].unit == "steps"
    assert last["capture"].total == 2 * len(edit) * 2 * 2  # D and T(D), once and with one augmented copy, per trigger
    assert last["evaluation"].total == len(held) + int((held.labels != TEST_TARGET).sum())
    assert np.isfinite(last["selection"].total)


def test_the_cli_draws_one_bar_per_stage_with_its_rate(monkeypatch):
    import io
    import time

    from rich.console import Console

    import cli
    from agme_hub.progress import StageProgress

    screen = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=screen, force_terminal=True, width=120))
    with cli._StageBars(True) as bars:
        for done in (0, 100, 200):
            bars(StageProgress("capture", done, 200, "images"))
            time.sleep(0.02)
        bars(StageProgress("selection", 30, 30, "trial edits"))
        for done in (0, 25, 50):  # a later layer's capture starts the stage again
            bars(StageProgress("capture", done, 100, "images"))
            time.sleep(0.02)
        shown = {t.description: (t.completed, t.total, t.fields["unit"], t.fields["rate"]) for t in bars.bars.tasks}
    assert shown["capture"][:3] == (50, 100, "images") and shown["capture"][3].endswith("/s")
    assert shown["selection"][:3] == (30, 30, "trial edits")
    assert "capture" in screen.getvalue()
    with cli._StageBars(False) as quiet:  # --json: nothing is drawn
        quiet(StageProgress("capture", 1, 2, "images"))
        assert quiet.bars is None
