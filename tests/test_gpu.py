"""The CUDA side of devices (issue 14): runs where CUDA is present, skipped everywhere else.

A clean on the GPU gives the edit a clean on the CPU gives (the statistics and the solve are float64 on both;
only the network's float32 forward passes differ by rounding), the returned model is back where the caller's
model was, and ``agme clean --device cuda`` works end to end. The CPU side is ``tests/test_devices.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import agme_hub
from agme_hub import constants
from agme_hub.constants import REPORT_NAME, WEIGHTS_NAME
from agme_hub.data import balanced_indices
from agme_hub.devices import model_device, resolve_device
from agme_hub.engine.edit import GramStats, solve_edit
from cli import app
from tests.conftest import TEST_TARGET

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TRIGGER = "badnets-white-br"
# Weights of the same edit on two devices: float32 forward passes round differently (cuDNN picks other
# algorithms), the float64 statistics inherit that, and the float32 weights keep ~1e-6 of it.
WEIGHT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def model_and_data(backdoored, fmnist_test):
    result = backdoored(TRIGGER)
    edit = fmnist_test.subset(balanced_indices(fmnist_test.labels, 5, seed=0))
    held = fmnist_test.subset(balanced_indices(fmnist_test.labels, 40, seed=1)[5 * 10:])
    return result.model, edit, held, result.out_dir


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double().cpu() - sb[k].double().cpu()).abs().max())
               for k in sa if sa[k].is_floating_point())


def test_auto_is_cuda_here():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_a_cuda_clean_gives_the_cpu_edit(model_and_data):
    model, edit, held, _ = model_and_data
    kwargs = dict(trigger=TRIGGER, target=TEST_TARGET, augment_copies=1)
    on_cpu = agme_hub.clean(model, edit, device="cpu", **kwargs)
    on_gpu = agme_hub.clean(model, edit, device="cuda", **kwargs)
    assert on_gpu.device.startswith("cuda") and on_gpu.batch_size > on_cpu.batch_size
    assert model_device(model).type == "cpu", "the caller's model stays where it was"
    assert model_device(on_gpu.model).type == "cpu", "the result comes back to the caller's device"
    assert (on_gpu.layers, on_gpu.lam) == (on_cpu.layers, on_cpu.lam)
    assert _max_diff(on_cpu.model, on_gpu.model) < WEIGHT_TOLERANCE
    cpu_metrics = agme_hub.evaluate(on_cpu.model, held, TRIGGER, TEST_TARGET)
    gpu_metrics = agme_hub.evaluate(on_gpu.model, held, TRIGGER, TEST_TARGET, device="cuda")
    assert abs(cpu_metrics.clean_accuracy - gpu_metrics.clean_accuracy) <= 2 / len(held)
    assert gpu_metrics.attack_success_rate < 0.2


def test_a_model_on_the_gpu_is_cleaned_and_returned_there(model_and_data):
    model, edit, _, _ = model_and_data
    import copy

    on_gpu = copy.deepcopy(model).cuda()
    result = agme_hub.clean(on_gpu, edit, trigger=TRIGGER, target=TEST_TARGET, layers=["fc"], lam=0.1,
                            augment_copies=1)  # device=None: where the model is
    assert result.device.startswith("cuda") and model_device(result.model).type == "cuda"
    reference = agme_hub.clean(model, edit, trigger=TRIGGER, target=TEST_TARGET, layers=["fc"], lam=0.1,
                               augment_copies=1)
    assert _max_diff(reference.model, result.model) < WEIGHT_TOLERANCE


def test_inversion_and_bn_recompute_run_on_the_gpu(model_and_data):
    model, edit, _, _ = model_and_data
    result = agme_hub.clean(model, edit, target=TEST_TARGET, device="cuda", augment_copies=1, inversion_steps=20,
                            bn_stats="recompute")
    assert result.trigger_kind == "surrogate" and model_device(result.model).type == "cpu"
    assert result.trigger.mask_array.shape[:2] == edit.images.shape[1:3]


def test_blockwise_solve_agrees_across_devices(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    stats = {where: GramStats.zeros(40, block=16, device=where) for where in ("cpu", "cuda")}
    for _ in range(10):
        kc = torch.randn(32, 40, generator=generator, dtype=torch.float64)
        kt = kc + 0.3 * torch.randn(32, 40, generator=generator, dtype=torch.float64)
        is_target = torch.arange(32) % 4 == 0
        for where, s in stats.items():
            s.add(kc.to(where), kt.to(where), is_target.to(where))
    w0 = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    solved = {where: solve_edit(w0, s, lam=0.1, gamma=1.0, target_weight=4.0).cpu() for where, s in stats.items()}
    assert torch.allclose(solved["cpu"], solved["cuda"], atol=1e-9)


def test_cli_clean_device_cuda_end_to_end(model_and_data, tmp_path):
    _, _, _, model_dir = model_and_data
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["clean", str(model_dir), "--data", "fashion-mnist", "--per-class", "5",
                                      "--eval-per-class", "20", "--augment-copies", "1", "--trigger", TRIGGER,
                                      "--target", str(TEST_TARGET), "--device", "cuda", "--batch-size", "64",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads(result.stdout)
    assert record["status"] == "complete" and record["options"]["device"] == "cuda"
    assert record["runtime"]["device"].startswith("cuda") and record["runtime"]["batch_size"] == 64  # where it ran
    assert record["after"]["attack_success_rate"] < 0.2
    assert (out / WEIGHTS_NAME).is_file() and (out / REPORT_NAME).is_file()
    assert "--device" not in record["command"], "the reproduce command runs anywhere"
    reloaded = agme_hub.load(out)
    assert model_device(reloaded).type == "cpu"


def test_cli_eval_device_cuda(model_and_data):
    _, _, _, model_dir = model_and_data
    on_gpu = CliRunner().invoke(app, ["eval", str(model_dir), "--data", "fashion-mnist", "--trigger", TRIGGER,
                                      "--target", str(TEST_TARGET), "--device", "cuda", "--json"])
    on_cpu = CliRunner().invoke(app, ["eval", str(model_dir), "--data", "fashion-mnist", "--trigger", TRIGGER,
                                      "--target", str(TEST_TARGET), "--device", "cpu", "--json"])
    assert on_gpu.exit_code == 0 and on_cpu.exit_code == 0, (on_gpu.output, on_cpu.output)
    gpu, cpu = json.loads(on_gpu.stdout)["metrics"], json.loads(on_cpu.stdout)["metrics"]
    assert abs(gpu["clean_accuracy"] - cpu["clean_accuracy"]) < 0.005
    assert constants.MAX_KEY_DIM == 8192  # nothing above lowered the cap for this process
