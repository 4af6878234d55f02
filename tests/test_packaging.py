"""A non-editable install (a wheel) carries everything the library needs at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_package_the_cli_and_the_card_template(tmp_path):
    pytest.importorskip("setuptools")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("agme-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cli.py" in names
    assert "agme_hub/model_cards/agme_card.md.jinja" in names
    assert {"agme_hub/engine/clean.py", "agme_hub/app/batch/__init__.py", "agme_hub/lab/baselines/__init__.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "agme = cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
