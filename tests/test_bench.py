"""The benchmark grid: a tiny grid runs end to end on real data and writes csv/json/md/png; the table marks rows."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from agme_hub.lab.bench import (DEFENCES, AblationConfig, BenchConfig, PeakMemory, aggregate, best_per_cell,
                                forward_floor, run_ablation, run_bench, write_outputs)
from agme_hub.errors import UsageError

# Seconds on 2 cores: a narrow ResNet trained on 60 images per class for 2 epochs. The backdoor only has to
# take well enough to be measured; the thresholds are lowered so the tiny model counts as backdoored.
TINY = dict(archs=("resnet10t",), triggers=("badnets-white-br",), budgets=(1, 2), n_train=60, epochs=3,
            eval_per_class=10, defences=("agme-bdk", "agme-nobdk", "ft", "clp"), min_asr=0.0, warn_asr=0.0,
            agme_options={"inversion_steps": 10}, baseline_overrides={"ft": {"epochs": 2}}, name="tiny")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(model_cache=str(out / "cache"), **TINY)
    seen = []
    rows = run_bench(config, out / "results", on_row=seen.append, command="pytest tiny grid")
    return config, out / "results", rows, seen


def test_tiny_grid_writes_every_output(tiny_run):
    config, out, rows, seen = tiny_run
    assert len(rows) == len(config.budgets) * len(config.defences) == len(seen)
    for name in ("runs.csv", "runs.json", "table.md", "asr_vs_budget.png", "ca_vs_budget.png", "time_per_defence.png",
                 "agme_edit_vs_floor.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "asr_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "runs.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    record = json.loads((out / "runs.json").read_text())
    assert record["command"] == "pytest tiny grid" and len(record["rows"]) == len(rows)
    assert record["backdoors"][0]["backdoor_asr"] is not None
    text = (out / "table.md").read_text()
    assert "## Headline" in text and "`agme-bdk`" in text and "pytest tiny grid" in text
    # natural confusion: the backdoored model's clean non-target images sent to the target, the bars' floor
    confusion = record["backdoors"][0]["backdoor_confusion"]
    assert 0.0 <= confusion <= 1.0 and all(r["backdoor_confusion"] == confusion for r in rows)
    bars = text.split("## AGME against the issues' bars")[1].split("##")[0]
    assert "cells ASR <= natural + 2 pt" in bars and "`agme-bdk`" in bars and "`agme-nobdk`" in bars


def test_rows_hold_metrics_times_memory_and_ratios(tiny_run):
    _, _, rows, _ = tiny_run
    for row in rows:
        assert row["status"] == "ok", row.get("reason")
        for key in ("ca", "asr", "ta", "ra", "der", "seconds", "floor_seconds"):
            assert row[key] is not None and row[key] >= 0, key
        assert 0 <= row["der"] <= 1
        assert row["peak_rss_mb"] is None or row["peak_rss_mb"] >= 0
        assert row["n_edit"] == 10 * row["per_class"]
        assert row["hparams"]
    agme = [r for r in rows if r["defence"] == "agme-bdk"]
    assert all(r["time_vs_agme_bdk"] == pytest.approx(1.0) for r in agme)
    assert all(r["agme_edit_seconds"] > 0 and r["edit_over_floor"] > 0 for r in agme)
    assert all(r["agme_inversion_seconds"] > 0 for r in rows if r["defence"] == "agme-nobdk")
    assert all(r["hparams"]["mode"] == "no-bdk" for r in rows if r["defence"] == "agme-nobdk")
    # The same fixed evaluation images for every budget and defence.
    assert len({r["n_eval"] for r in rows}) == 1


def test_interrupted_grid_resumes_without_rerunning(tiny_run):
    config, out, rows, _ = tiny_run
    seen = []
    again = run_bench(config, out, on_row=seen.append)
    assert not seen  # every cell came from runs.partial.jsonl
    assert [(r["defence"], r["per_class"], r["ca"]) for r in again] == [(r["defence"], r["per_class"], r["ca"])
                                                                         for r in rows]


def test_failed_backdoor_is_marked_not_hidden(tiny_run, tmp_path):
    config, _, _, _ = tiny_run
    strict = BenchConfig(**{**TINY, "min_asr": 1.01, "budgets": (1,)}, model_cache=config.model_cache)
    rows = run_bench(strict, tmp_path, resume=False)
    assert rows and all(r["status"] == "backdoor not learned" and r["ca"] is None for r in rows)
    text = (tmp_path / "table.md").read_text()
    assert "backdoor not learned" in text and "| **no** |" in text


def _row(cell_trigger, defence, der, ca, seed=0, status="ok"):
    return {"dataset": "d", "arch": "a", "trigger": cell_trigger, "per_class": 5, "seed": seed, "defence": defence,
            "knowledge": DEFENCES[defence][1], "status": status, "backdoor_ok": True, "backdoor_ca": 0.9, "backdoor_ta": 0.85,
            "backdoor_asr": 1.0, "ca": ca, "asr": 1 - der, "ta": 0.8, "ra": 0.5, "der": der, "seconds": 1.0,
            "peak_rss_mb": 10.0}


def test_table_marks_the_best_defence_per_cell(tmp_path):
    rows = [
        _row("t1", "agme-bdk", 0.9, 0.85), _row("t1", "agme-bdk", 0.7, 0.85, seed=1),  # mean 0.8
        _row("t1", "ft", 0.85, 0.80), _row("t1", "ft", 0.85, 0.80, seed=1),  # mean 0.85: best
        _row("t1", "clp", 0.0, 0.0, status="not applicable"),
        _row("t2", "agme-bdk", 0.95, 0.85), _row("t2", "agme-nobdk", 0.9, 0.86), _row("t2", "ft", 0.9, 0.80),
    ]
    aggregated = aggregate(rows)
    first = next(a for a in aggregated if a["trigger"] == "t1" and a["defence"] == "agme-bdk")
    assert first["der"] == pytest.approx(0.8) and first["der_std"] == pytest.approx(0.1414, abs=1e-3)
    assert best_per_cell(aggregated) == {("d", "a", "t1", 5): "ft", ("d", "a", "t2", 5): "agme-bdk"}
    # Without the trigger-knowing AGME: nobdk and ft tie on DER in t2; higher CA wins.
    assert best_per_cell(aggregated, exclude_knowledge=("trigger+target",))[("d", "a", "t2", 5)] == "agme-nobdk"
    write_outputs(rows, tmp_path)
    lines = (tmp_path / "table.md").read_text().splitlines()
    marked = [line for line in lines if line.startswith("| d | a |") and "★" in line]
    assert len(marked) == 2
    assert any("t1" in line and "**`ft`** ★†" in line for line in marked)
    assert any("t2" in line and "**`agme-bdk`** ★" in line for line in marked)
    assert any("t2" in line and "**`agme-nobdk`** †" in line for line in lines)
    assert any("t1" in line and "`clp`" in line and "not applicable" in line for line in lines)
    assert any(line.startswith("`agme-bdk` beats the best baseline on DER in 1 of 2 cells and loses in 1;")
               for line in lines)


def test_peak_memory_sees_torch_tensors():
    with PeakMemory() as mem:
        block = torch.ones(64, 1024, 1024)  # 256 MiB
        del block
    assert mem.method != "none"
    assert mem.peak_mb is not None and mem.peak_mb > 200


def test_forward_floor_counts_every_augmented_copy(fmnist_test):
    from agme_hub import parse_trigger
    from agme_hub.lab.backdoor import create_classifier

    model = create_classifier("resnet10t", num_classes=10, in_chans=1, img_size=32, mean=(0.3,), std=(0.3,),
                              model_args={"channels": [16, 32, 64, 128]})
    data = fmnist_test.subset(range(7))
    seconds, images = forward_floor(model, data, parse_trigger("badnets-white-br"), copies=2)
    assert seconds > 0 and images == 7 * 3 * 2


def test_bad_grid_is_refused():
    with pytest.raises(UsageError, match="unknown defence"):
        BenchConfig(defences=("agme", "ft"))
    with pytest.raises(UsageError, match="unknown bench architecture"):
        BenchConfig(archs=("resnet9000",))
    with pytest.raises(UsageError, match="at least 1"):
        BenchConfig(budgets=(0,))


def test_ablation_sweeps_lam_and_gamma_with_both_batchnorm_modes(tiny_run, tmp_path):
    config, _, _, _ = tiny_run  # the tiny grid's backdoored model, from its cache
    ablation = AblationConfig(bench=config, arch="resnet10t", trigger="badnets-white-br", per_class=2,
                              lams=(0.01, 1.0), gammas=(1.0, 3.0))
    rows = run_ablation(ablation, tmp_path, command="pytest ablation")
    assert len(rows) == 2 * (2 + 2)
    for name in ("ablation.csv", "ablation.json", "ablation.md", "ablation.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "ablation.json").read_text())
    assert record["layers"] == ["layer4.0.conv1", "layer4.0.downsample.1"]  # the entry group, fixed at every point
    assert all(r["layers"] == ",".join(record["layers"]) for r in rows)
    assert all(r[k] is not None for r in rows for k in ("ca", "asr", "ta", "ta_no_repair"))
    keep = {(r["lam"], r["gamma"]): r for r in rows if r["bn_stats"] == "keep"}
    recompute = {(r["lam"], r["gamma"]): r for r in rows if r["bn_stats"] == "recompute"}
    assert set(keep) == set(recompute) == {(0.01, 1.0), (1.0, 1.0), (0.01, 3.0)}
    # The edit feeds BatchNorms: re-estimating their averages changes the model's predictions somewhere.
    assert any((keep[p]["ca"], keep[p]["asr"], keep[p]["ta"]) != (recompute[p]["ca"], recompute[p]["asr"],
                                                                   recompute[p]["ta"]) for p in keep)
    # A larger ridge keeps the model closer to the backdoored one: the backdoor survives more of it.
    assert keep[(1.0, 1.0)]["asr"] >= keep[(0.01, 1.0)]["asr"]
    with open(tmp_path / "ablation.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    text = (tmp_path / "ablation.md").read_text()
    assert "## Against lam" in text and "## Against gamma" in text and "pytest ablation" in text


def test_bad_ablation_is_refused():
    with pytest.raises(UsageError, match="lam"):
        AblationConfig(lams=(0.0,))
    with pytest.raises(UsageError, match="bn-stats"):
        AblationConfig(bn_stats=("keep", "sometimes"))
    with pytest.raises(UsageError, match="unknown bench architecture"):
        AblationConfig(arch="resnet9000")


def test_cli_ablation_refuses_an_unknown_architecture_before_any_work(tmp_path):
    from typer.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.app, ["bench", "--ablation", "--archs", "resnet9000", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "unknown bench architecture" in result.output
    assert not (tmp_path / "a").exists()
