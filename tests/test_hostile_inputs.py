"""The defects found by trying to break agme (shared/reference/red_team_2026-12.md), one test each.

Each test reproduces a case of that list through the CLI (Typer's CliRunner, or a subprocess where the exit
itself is the point) and asserts the fixed behaviour: one ``error:`` line, the error's own exit code, nothing
written or deleted that should not be. Defect numbers of the list are in the test names' comments.

The model is a tiny timm ``test_resnet`` (random weights, 3 classes, 1x32x32) and the data real Fashion-MNIST
images of 3 classes: the point here is what agme does with hostile inputs, not how well it cleans.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from agme_hub import errors
from tests.helpers import save_tiny_model, write_three_class_npz
from agme_hub.constants import CARD_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME
from cli import app
from tests.fixtures_hub import read_folder
from tests.misbehaving_servers import CannedServer, HangingServer, point_hub_at

REPO_ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CHEAP = ["--per-class", "5", "--lam", "0.1", "--layers", "fc", "--augment-copies", "1",
         "--trigger", "badnets-white-br", "--target", "0"]


def agme(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int) -> str:
    """Failed with ``code``: one ``error:`` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, repr(result.exception))
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# fixtures: a tiny model folder, real 3-class data, and one real clean output (all built once)
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> Path:
    """20 real Fashion-MNIST test images of each of classes 0, 1, 2 as an .npz."""
    return write_three_class_npz(tmp_path_factory.mktemp("data") / "d3.npz", per_class=20)


@pytest.fixture(scope="module")
def clean_output(tiny_model, data3, tmp_path_factory) -> Path:
    """The output folder of one real `agme clean` run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    result = agme("clean", tiny_model, "--data", data3, *CHEAP, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.fixture
def output_copy(clean_output, tmp_path) -> Path:
    folder = tmp_path / "out"
    shutil.copytree(clean_output, folder)
    return folder


# 1. P04: a re-run must not delete the user's files in an earlier output folder without --yes
def test_rerun_keeps_files_the_user_added(tiny_model, data3, output_copy):
    (output_copy / "NOTES.txt").write_text("my notes")
    (output_copy / "experiments").mkdir()
    (output_copy / "experiments" / "run1.csv").write_text("a,b\n1,2\n")
    before = snapshot(output_copy)

    line = one_line_error(agme("clean", tiny_model, "--data", data3, *CHEAP, "--out", output_copy),
                          errors.OutputExistsError.exit_code)

    assert "--yes" in line and ("NOTES.txt" in line or "experiments" in line)
    assert snapshot(output_copy) == before


def test_rerun_keeps_an_edited_card_and_a_folder_without_the_list(tiny_model, data3, output_copy, tmp_path):
    (output_copy / CARD_NAME).write_text((output_copy / CARD_NAME).read_text() + "\nMy own remarks.\n")
    one_line_error(agme("clean", tiny_model, "--data", data3, *CHEAP, "--out", output_copy),
                   errors.OutputExistsError.exit_code)
    # An older agme folder (report and card, but no list of written files) is not provably agme's either.
    legacy = tmp_path / "legacy"
    shutil.copytree(output_copy, legacy)
    report = json.loads((legacy / REPORT_NAME).read_text())
    del report["output_files"]
    (legacy / REPORT_NAME).write_text(json.dumps(report))
    one_line_error(agme("clean", tiny_model, "--data", data3, *CHEAP, "--out", legacy),
                   errors.OutputExistsError.exit_code)


def test_rerun_replaces_an_untouched_agme_folder(tiny_model, data3, output_copy):
    result = agme("clean", tiny_model, "--data", data3, *CHEAP, "--out", output_copy, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert json.loads((output_copy / REPORT_NAME).read_text())["options"]["seed"] == 3


# 2. H22: push never follows a symbolic link out of the folder
@pytest.mark.parametrize("target", ["token", "outside"])
def test_push_refuses_symbolic_links(hub_env, output_copy, tmp_path, target):
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_secretsecretsecret")
    link_target = hub_env.hf_home / "token" if target == "token" else secret
    link_target.write_text("hf_secretsecretsecret")
    (output_copy / "notes.txt").symlink_to(link_target)

    line = one_line_error(agme("push", output_copy, "me/published"), errors.PushError.exit_code)

    assert "notes.txt" in line and "link" in line
    assert hub_env.server.commit_count == 0 and "me/published" not in hub_env.server.repos


# 4. P07: --out overlapping an input is refused, even with --yes
@pytest.mark.parametrize("where", ["source", "source-parent", "inside-source", "data-parent", "data"])
def test_out_overlapping_an_input_is_refused(tiny_model, data3, tmp_path, where):
    inputs = tmp_path / "inputs"
    model = shutil.copytree(tiny_model, inputs / "model")
    data = Path(shutil.copy(data3, inputs / "d3.npz"))
    out = {"source": model, "source-parent": inputs, "inside-source": model / "cleaned",
           "data-parent": inputs, "data": data}[where]
    before = snapshot(inputs)

    line = one_line_error(agme("clean", model, "--data", data, *CHEAP, "--out", out, "--yes"),
                          errors.OutputOverlapsInputError.exit_code)

    assert "--out" in line
    assert snapshot(inputs) == before


# 5. S_inj and P02: an interrupt between the two renames restores the previous output
def test_interrupt_between_the_renames_restores_the_previous_output(tmp_path, monkeypatch):
    from agme_hub.hub import checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous output")
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the second rename: the new folder into place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new output")
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)

    assert snapshot(out) == {"old.txt": b"previous output"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_during_the_swap_waits_until_both_renames_are_done(tmp_path, monkeypatch):
    from agme_hub.hub import checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous output")
    real_replace = os.replace

    def replace_with_ctrl_c(src, dst):
        result = real_replace(src, dst)
        if str(dst).endswith(f".old-{os.getpid()}"):
            os.kill(os.getpid(), signal.SIGINT)  # lands between the two renames
        return result

    monkeypatch.setattr(checkpoint.os, "replace", replace_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new output")

    assert snapshot(out) == {"new.txt": b"new output"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_previous_output_hidden_by_a_killed_run_is_put_back(tmp_path):
    from agme_hub.hub import checkpoint

    hidden = tmp_path / ".out.old-4242"  # what a run killed (SIGKILL) between the two renames leaves
    hidden.mkdir()
    (hidden / "old.txt").write_text("previous output")
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_output_dir(tmp_path / "out", overwrite=True):
            raise RuntimeError("the new run fails too")
    assert snapshot(tmp_path / "out") == {"old.txt": b"previous output"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_file_with_yes_leaves_no_hidden_copy(tiny_model, data3, tmp_path):  # P02
    out = tmp_path / "result"
    out.write_text("a file the user chose to replace")
    result = agme("clean", tiny_model, "--data", data3, *CHEAP, "--out", out, "--yes")
    assert result.exit_code == 0, result.output
    assert out.is_dir() and (out / WEIGHTS_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


# X01: outputs get the user's umask, not 0700/0600
def test_outputs_follow_the_umask(clean_output):
    mask = os.umask(0o022)
    os.umask(mask)
    assert clean_output.stat().st_mode & 0o777 == 0o777 & ~mask
    for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, REPORT_NAME):
        assert (clean_output / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


# 6. H18: a Hub that never answers fails within the timeout, with a network error
@pytest.mark.parametrize("command", ["inspect", "clean"])
def test_a_hanging_hub_times_out(hub_env, monkeypatch, data3, tmp_path, command):
    monkeypatch.setenv("AGME_HUB_TIMEOUT", "2")
    with HangingServer() as url:
        point_hub_at(monkeypatch, url)
        args = ["--data", data3, *CHEAP, "--out", tmp_path / "out"] if command == "clean" else []
        start = time.monotonic()
        line = one_line_error(agme(command, "org/never", *args), errors.NetworkError.exit_code)
        elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed
    assert "org/never" in line
    assert not (tmp_path / "out").exists()


# 7. olah: the revision is sent explicitly ("main"), as snapshot_download does
def test_model_info_is_asked_with_an_explicit_revision(hub_env, tiny_model):
    hub_env.server.commit("org/tiny", read_folder(tiny_model))
    result = agme("inspect", "org/tiny")
    assert result.exit_code == 0, result.output
    paths = [r.path for r in hub_env.server.requests if r.path.startswith("/api/models/")]
    assert "/api/models/org/tiny/revision/main" in paths
    assert "/api/models/org/tiny" not in paths, "a bare model_info is not answered by mirrors such as olah"


# 29. H19: a 200 whose body is not JSON
def test_a_non_json_hub_answer_is_a_network_error(hub_env, monkeypatch):
    with CannedServer(200, b"<html><body>captive portal</body></html>") as url:
        point_hub_at(monkeypatch, url)
        line = one_line_error(agme("inspect", "org/x"), errors.NetworkError.exit_code)
    assert "JSON" in line


# 10, 21, 34, 37: options validated before anything else (a missing Hub repo would give exit 20)
@pytest.mark.parametrize("flags", [
    ["--lam", "nan"], ["--lam", "inf"], ["--gamma", "nan"], ["--target-weight", "inf"], ["--seed", "-1"],
    ["--eval-per-class", "-1"], ["--eval-per-class", "0"], ["--push-to", "a/b/c"], ["--push-to", "no-slash"],
])
def test_bad_options_fail_up_front(hub_env, data3, tmp_path, flags):
    line = one_line_error(agme("clean", "org/does-not-exist", "--data", data3, *flags, "--out", tmp_path / "o"),
                          errors.UsageError.exit_code)
    assert flags[0] in line
    assert not any(r.path.startswith("/api/models/") for r in hub_env.server.requests), "validated before the Hub"


# 22-27: trigger fields validated when parsed
@pytest.mark.parametrize("spec", [
    "blend:alpha=1e400", "blend:alpha=nan", "patch:fill=#zzzzzz", "patch:margin=-5", "patch:fill=noise,seed=-1",
    "lsb:seed=-3", "patch:size=[1]",
])
def test_bad_trigger_fields_fail_up_front(hub_env, data3, spec):
    one_line_error(agme("clean", "org/does-not-exist", "--data", data3, "--trigger", spec),
                   errors.TriggerSpecError.exit_code)
    assert not any(r.path.startswith("/api/models/") for r in hub_env.server.requests)


def test_a_margin_too_large_for_the_images_fails_before_the_clean(tiny_model, data3, tmp_path):  # T21
    line = one_line_error(agme("clean", tiny_model, "--data", data3, "--trigger", "patch:size=3,margin=100",
                               "--target", "0", "--out", tmp_path / "out"), errors.ShapeMismatchError.exit_code)
    assert "margin 100" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["pickled", "one-d", "text"])
def test_bad_npy_deltas_are_trigger_errors(data3, tmp_path, content):  # T17, T18
    path = tmp_path / "delta.npy"
    if content == "pickled":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif content == "one-d":
        np.save(path, np.zeros(32, np.float32))
    else:
        path.write_text("not numpy")
    line = one_line_error(agme("clean", "org/x", "--data", data3, "--trigger", f"additive:delta={path}"),
                          errors.TriggerSpecError.exit_code)
    assert "delta" in line and "allow_pickle" not in line


# 12-18, 32: config.json fields validated, the field named, by inspect and clean alike
CONFIG_CASES = {
    "unknown-architecture": ({"architecture": "no_such_net"}, "architecture"),
    "numeric-architecture": ({"architecture": 123}, "architecture"),
    "hub-architecture": ({"architecture": "hf-hub:evil/repo"}, "architecture"),
    "absurd-input-size": ({"pretrained_cfg": {"input_size": [3, 100000, 100000]}}, "input_size"),
    "negative-input-size": ({"pretrained_cfg": {"input_size": [3, -1, 32]}}, "input_size"),
    "model-args-list": ({"model_args": [1, 2]}, "model_args"),
    "pretrained-cfg-string": ({"pretrained_cfg": "abc"}, "pretrained_cfg"),
    "twelve-label-names": ({"label_names": [str(i) for i in range(12)]}, "label_names"),
    "five-label-names": ({"label_names": [str(i) for i in range(5)]}, "label_names"),
    "checkpoint-path": ({"model_args": {"in_chans": 1, "checkpoint_path": "/etc/passwd"}}, "checkpoint_path"),
}


@pytest.mark.parametrize("command", ["inspect", "clean"])
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_fields_are_named(model_copy, data3, tmp_path, case, command):
    change, field = CONFIG_CASES[case]
    config = json.loads((model_copy / CONFIG_NAME).read_text())
    for key, value in change.items():
        if key == "pretrained_cfg" and isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    (model_copy / CONFIG_NAME).write_text(json.dumps(config))
    args = ["--data", data3, *CHEAP, "--out", tmp_path / "out"] if command == "clean" else []
    line = one_line_error(agme(command, model_copy, *args), errors.InvalidConfigError.exit_code)
    assert field in line
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_utf8(model_copy):  # K14
    (model_copy / CONFIG_NAME).write_bytes(b'{"architecture": "test_resnet", "x": "\xff\xfe"}')
    line = one_line_error(agme("inspect", model_copy), errors.InvalidConfigError.exit_code)
    assert "UTF-8" in line


# 9, 31: NaN/Inf weights and mismatched tensors are named when the weights are loaded
@pytest.mark.parametrize("change", ["nan", "inf", "missing", "extra", "shape"])
def test_bad_weights_name_the_tensor(model_copy, data3, change):
    from safetensors.torch import load_file, save_file

    state = load_file(model_copy / WEIGHTS_NAME)
    if change in ("nan", "inf"):
        state["fc.weight"][0, 0] = float(change)
    elif change == "missing":
        del state["fc.weight"]
    elif change == "extra":
        state["extra.weight"] = torch.zeros(2)
    else:
        state["fc.weight"] = torch.zeros(5, 5)
    save_file(state, model_copy / WEIGHTS_NAME)

    line = one_line_error(agme("eval", model_copy, "--data", data3), errors.InvalidWeightsError.exit_code)
    assert ("extra.weight" if change == "extra" else "fc.weight") in line


# 11: a pickle refused by the safe loader under --allow-pickle: one line, no advice to disable the safety
def test_refused_pickle_under_allow_pickle(model_copy, data3, tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (model_copy / WEIGHTS_NAME).unlink()
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps({"fc.weight": Exploit()}))

    line = one_line_error(agme("eval", model_copy, "--data", data3, "--allow-pickle"),
                          errors.PickleRefusedError.exit_code)
    assert "weights_only=False" not in line and "pytorch_model.bin" in line
    assert not (tmp_path / "pwned").exists()


# 19, 35, 20, 38 (N_n_notzip), 36: data
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (what a decompression bomb looks like before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [20000, 12000])
def test_huge_images_are_refused_before_decoding(tiny_model, tmp_path, side):  # D04, D05
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        _png_header_only(tmp_path / "data" / cls / "big.png", side, side)
    line = one_line_error(agme("eval", tiny_model, "--data", tmp_path / "data"), errors.DataError.exit_code)
    assert "big.png" in line and "Mpx" in line


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):  # D06
    from PIL import Image

    from agme_hub.data import load_image_folder

    values = np.array([[0, 257 * 64], [257 * 128, 65535]], np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(values).save(tmp_path / "a" / "x.png")
    loaded = load_image_folder(tmp_path)
    assert loaded.images[0, ..., 0].tolist() == [[0, 64], [128, 255]]


@pytest.mark.parametrize("case", ["string-labels", "text-file", "pickled-labels"])
def test_bad_npz_files_are_data_errors(tiny_model, tmp_path, case):
    path = tmp_path / "data.npz"
    x = np.zeros((6, 32, 32), np.uint8)
    if case == "string-labels":
        np.savez(path, x=x, y=np.array(["a", "b", "c", "a", "b", "c"]))
    elif case == "text-file":
        path.write_text("this is not an archive\n" * 10)
    else:
        np.savez(path, x=x, y=np.array([{"a": 1}] * 6, dtype=object))
    line = one_line_error(agme("eval", tiny_model, "--data", path), errors.DataError.exit_code)
    assert "allow_pickle" not in line and "data.npz" in line


def test_one_class_data_is_refused(tiny_model, data3, tmp_path):  # D14
    with np.load(data3) as npz:
        x, y = npz["x"], npz["y"]
    np.savez(tmp_path / "only0.npz", x=x[y == 0], y=y[y == 0])
    line = one_line_error(agme("clean", tiny_model, "--data", tmp_path / "only0.npz", *CHEAP,
                               "--out", tmp_path / "out"), errors.DataError.exit_code)
    assert "one class" in line and not (tmp_path / "out").exists()


# 28: a --out that cannot be written fails before the run
@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_unwritable_out_fails_up_front(tiny_model, data3, tmp_path, where):
    (tmp_path / "afile").write_text("x")
    out = Path("/proc/agme-cannot-write-here") if where == "proc" else tmp_path / "afile" / "out"
    start = time.monotonic()
    one_line_error(agme("clean", tiny_model, "--data", data3, *CHEAP, "--out", out),
                   errors.OutputNotWritableError.exit_code)
    assert time.monotonic() - start < 20  # no model was loaded or run


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_fails_up_front(tiny_model, data3, tmp_path):  # P05
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        one_line_error(agme("clean", tiny_model, "--data", data3, *CHEAP, "--out", parent / "out"),
                       errors.OutputNotWritableError.exit_code)
    finally:
        parent.chmod(0o700)


# 30, 33: agme card
def test_card_on_a_report_without_metrics(output_copy):
    report = json.loads((output_copy / REPORT_NAME).read_text())
    for key in ("before", "after"):
        report.pop(key)
    (output_copy / REPORT_NAME).write_text(json.dumps(report))
    line = one_line_error(agme("card", output_copy), errors.ReportError.exit_code)
    assert "before" in line


def test_card_suggests_a_flag_it_has(output_copy):
    (output_copy / CARD_NAME).write_text("# My own card\n")
    line = one_line_error(agme("card", output_copy), errors.OutputExistsError.exit_code)
    assert "--yes" in line
    result = agme("card", output_copy, "--yes")
    assert result.exit_code == 0, result.output
    assert "My own card" not in (output_copy / CARD_NAME).read_text()
    # the card agme wrote is now listed as agme's: a re-run may replace the folder
    from agme_hub.hub.outputs import is_agme_folder

    assert is_agme_folder(output_copy) == (True, "")


# 8: Ctrl-C while agme is still importing its modules: one line, exit 130, no traceback
def test_ctrl_c_during_start_up_prints_no_traceback():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "--help"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt inside the imports of torch (seconds), after cli.py installed its handler: wait until torch's
    # library is mapped rather than a fixed time, which a loaded machine can make too short.
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():
        proc.kill()
        pytest.skip("needs /proc to see when the child reaches the imports")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    if proc.returncode == 0:
        pytest.skip("the imports finished within 0.5 s: nothing to interrupt on this machine")
    assert proc.returncode == 130 and err.strip().splitlines() == ["error: interrupted while starting; nothing was done"]


def test_a_bad_config_on_the_hub_is_refused_before_the_weights_are_downloaded(hub_env, tiny_model, data3, tmp_path):
    files = read_folder(tiny_model)
    config = json.loads(files[CONFIG_NAME])
    config["architecture"] = "no_such_net"
    hub_env.server.commit("org/badconfig", {**files, CONFIG_NAME: json.dumps(config).encode()})
    line = one_line_error(agme("clean", "org/badconfig", "--data", data3, *CHEAP, "--out", tmp_path / "out"),
                          errors.InvalidConfigError.exit_code)
    assert "no_such_net" in line and "org/badconfig" in line
    assert not [r for r in hub_env.server.requests if r.path.endswith(WEIGHTS_NAME)], "no weights downloaded"
