"""Random bytes and random field values as safetensors headers, config.json, images and trigger files.

Whatever agme is fed, it must end with exit 0 or one of its own error codes and one ``error:`` line: never exit 1
with a raw Python exception type (an unmapped exception). Seeded and bounded: 12 cases per input kind, each
case reproducible from its id.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agme_hub import errors
from tests.helpers import save_tiny_model, write_three_class_npz
from agme_hub.constants import CONFIG_NAME, WEIGHTS_NAME
from cli import app

runner = CliRunner()
CASES = 12
AGME_CODES = {cls.exit_code for cls in vars(errors).values()
              if isinstance(cls, type) and issubclass(cls, errors.AgmeError) and cls is not errors.AgmeError}
ODD_VALUES = [None, -1, 0, 1, 1e308, -1e308, 10**30, "x", "", "hf-hub:a/b", "../../etc", True, [], {}, [1, 2],
              [3, -5, 7], [3, 100000, 100000], {"a": 1}, "\u0000\u202e", [[1]], 0.5, "nan", [None]]


def agme(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_mapped(result, case: str) -> None:
    """Exit 0, or an agme exit code with one error line: no unmapped exception, no traceback."""
    assert "Traceback" not in result.output, (case, result.output)
    if result.exit_code == 0:
        return
    assert result.exit_code in AGME_CODES, (case, result.exit_code, result.output, repr(result.exception))
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> Path:
    return write_three_class_npz(tmp_path_factory.mktemp("data") / "d3.npz", per_class=4)


def random_bytes(rng: random.Random, size: int | None = None) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(size if size is not None else rng.randint(0, 300)))


@pytest.mark.parametrize("case", range(CASES))
def test_random_safetensors_headers(tiny_model, data3, tmp_path, case):
    rng = random.Random(1000 + case)
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    body = (folder / WEIGHTS_NAME).read_bytes()
    size = struct.unpack("<Q", body[:8])[0]
    if case % 3 == 0:  # random bytes where the header is
        header = random_bytes(rng, size)
    elif case % 3 == 1:  # a JSON header with random dtypes, shapes and offsets
        meta = json.loads(body[8:8 + size])
        for name in rng.sample(sorted(k for k in meta if k != "__metadata__"), 3):
            meta[name] = {"dtype": rng.choice(["F32", "F16", "I64", "BOOL", "XX", 7]),
                          "shape": rng.choice([[3], [1, 2, 3], [-1], [10**12], "x"]),
                          "data_offsets": rng.choice([[0, 4], [5, 1], [0, 10**15], None])}
        header = json.dumps(meta).encode()
    else:  # a length field that lies
        header = body[8:8 + size]
        size = rng.choice([0, 1, size + 7, 2**40, 2**64 - 1])
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", size) + header + body[8 + len(header):][:4096])
    assert_mapped(agme("eval", folder, "--data", data3), f"safetensors {case}")


@pytest.mark.parametrize("case", range(CASES))
def test_random_configs(tiny_model, tmp_path, case):
    rng = random.Random(2000 + case)
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    if case % 4 == 0:
        (folder / CONFIG_NAME).write_bytes(random_bytes(rng))
    else:
        config = json.loads((folder / CONFIG_NAME).read_text())
        for _ in range(rng.randint(1, 3)):
            where = rng.choice(["top", "pretrained_cfg", "model_args"])
            key = rng.choice({"top": ["architecture", "num_classes", "label_names", "model_args", "pretrained_cfg"],
                              "pretrained_cfg": ["input_size", "mean", "std", "crop_pct", "interpolation",
                                                 "first_conv", "crop_mode", "num_classes"],
                              "model_args": ["in_chans", "num_classes", "drop_rate", "global_pool"]}[where])
            target = config if where == "top" else config.setdefault(where, {})
            if isinstance(target, dict):
                target[key] = rng.choice(ODD_VALUES)
        (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert_mapped(agme("inspect", folder), f"config {case}")


@pytest.mark.parametrize("case", range(CASES))
def test_random_images(tiny_model, tmp_path, case):
    from PIL import Image

    rng = random.Random(3000 + case)
    root = tmp_path / "images"
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(root / cls / "good.png")
    png = (root / "a" / "good.png").read_bytes()
    bad = root / rng.choice(["a", "b", "c"]) / rng.choice(["bad.png", "bad.jpg", "bad.webp", "bad.bmp"])
    if case % 3 == 0:
        bad.write_bytes(random_bytes(rng))
    elif case % 3 == 1:  # a real PNG, cut or with random bytes after its signature
        cut = rng.randint(8, len(png) - 1)
        bad.write_bytes(png[:cut] + (random_bytes(rng, 20) if rng.random() < 0.5 else b""))
    else:  # a PNG header that claims random dimensions and bit depths
        ihdr = struct.pack(">IIBBBBB", rng.choice([0, 1, 2**31 - 1, 70000]), rng.choice([0, 1, 50000]),
                           rng.choice([1, 8, 16, 3]), rng.choice([0, 2, 3, 4, 6, 9]), 0, 0, 0)
        import zlib

        chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        bad.write_bytes(png[:8] + chunk + png[33:])
    assert_mapped(agme("eval", tiny_model, "--data", root), f"image {case}")


@pytest.mark.parametrize("case", range(CASES))
def test_random_trigger_files(tiny_model, data3, tmp_path, case):
    rng = random.Random(4000 + case)
    suffix = rng.choice([".json", ".yaml"])
    path = tmp_path / f"trigger{suffix}"
    if case % 3 == 0:
        path.write_bytes(random_bytes(rng))
    else:
        kind = rng.choice(["patch", "blend", "image", "additive", "lsb", "nope", 5])
        fields = ["size", "pos", "fill", "seed", "margin", "alpha", "image", "resize", "pattern", "mask", "delta",
                  "eps", "bits"]
        spec: dict = {"kind": kind}
        for key in rng.sample(fields, rng.randint(1, 4)):
            spec[key] = rng.choice(ODD_VALUES + ["3", "1x5", "bottom-right", "2,2", "#zzzzzz", "1e400", "16/0",
                                                 str(path), "noise"])
        path.write_text(json.dumps(spec))
    assert_mapped(agme("eval", tiny_model, "--data", data3, "--trigger", path, "--target", "0"),
                  f"trigger {case}")
