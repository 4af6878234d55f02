"""One options model: every knob declared once, with its flag, help text, default and check.

``MethodOptions`` holds the method's knobs (defaults from ``constants``); ``CleanOptions`` carries them; the
flags of ``agme clean`` are generated from the fields, and ``to_cli_args`` writes the flags back.
"""

from __future__ import annotations

import dataclasses
import math
import shlex

import click
import pytest
import timm
import typer
from typer.testing import CliRunner

import agme_hub
from agme_hub import constants
from agme_hub.data import load_images
from agme_hub.errors import UsageError
from agme_hub.options import CleanOptions, MethodOptions, cli_flags
import cli

runner = CliRunner()


def _clean_command() -> click.Command:
    return typer.main.get_command(cli.app).commands["clean"]


def test_every_clean_option_has_a_flag_with_help():
    params = {p.name: p for p in _clean_command().params}
    for f in dataclasses.fields(CleanOptions):
        assert f.name in params, f"CleanOptions.{f.name} has no flag on `agme clean`"
        param = params[f.name]
        flags = cli_flags(f)
        assert flags[0].split("/")[0] in param.opts, (f.name, param.opts)
        assert param.help and param.help == f.metadata["help"], f.name
    # the flag names and short aliases users type today
    opts = {o for p in params.values() for o in p.opts + p.secondary_opts}
    for flag in ("--yes", "-y", "--repair", "--no-repair", "--allow-pickle", "--layers", "--out", "--json", "-v",
                 "--verbose", "--dry-run", "--lam", "--per-class", "--eval-per-class", "--inversion-steps"):
        assert flag in opts, flag
    assert params["layers"].multiple
    help_text = runner.invoke(cli.app, ["clean", "--help"], terminal_width=200).output
    for panel in ("Data", "Backdoor", "Method", "Output", "Hub", "Dangerous"):
        assert panel in help_text


def test_method_defaults_are_the_constants():
    method = MethodOptions()
    assert method.gamma == constants.DEFAULT_GAMMA
    assert method.target_weight == constants.DEFAULT_TARGET_WEIGHT
    assert (method.refit_classifier, method.refit_lam) == (constants.DEFAULT_REFIT_CLASSIFIER,
                                                           constants.DEFAULT_REFIT_LAM)
    assert method.augment_copies == constants.DEFAULT_AUGMENT_COPIES
    assert method.inversion_steps == constants.DEFAULT_INVERSION_STEPS
    assert method.folds == constants.DEFAULT_FOLDS
    assert method.lam_grid == constants.DEFAULT_LAM_GRID
    assert method.surrogates == constants.DEFAULT_SURROGATES
    assert (method.surrogate_region, method.choose_surrogates) == (constants.DEFAULT_SURROGATE_REGION,
                                                                   constants.DEFAULT_CHOOSE_SURROGATES)
    assert (method.repair, method.layers, method.lam, method.bn_stats, method.seed) == (True, None, None, "keep", 0)
    # CleanOptions carries the same knobs with the same defaults and help
    assert CleanOptions().method == method
    methods = {f.name: f for f in dataclasses.fields(MethodOptions)}
    for f in dataclasses.fields(CleanOptions):
        if f.name in methods:
            assert f.default == methods[f.name].default and f.metadata["help"] == methods[f.name].metadata["help"]


def test_clean_options_method_carries_the_run_knobs():
    options = CleanOptions(data="mnist", layers=("fc",), lam=0.5, repair=False, seed=3, inversion_steps=20)
    assert options.method == MethodOptions(layers=("fc",), lam=0.5, repair=False, seed=3, inversion_steps=20)
    assert MethodOptions.with_overrides(options.method, lam=0.1).lam == 0.1
    assert MethodOptions(layers=["fc", "head"]).layers == ("fc", "head")


@pytest.mark.parametrize("bad", [
    {"lam": math.nan}, {"lam": math.inf}, {"lam": -0.1}, {"lam": 0.0}, {"gamma": math.nan}, {"gamma": -1.0},
    {"target_weight": math.inf}, {"target_weight": 0.0}, {"augment_copies": -1}, {"seed": -1},
    {"inversion_steps": 0}, {"bn_stats": "refresh"}, {"per_class": 0}, {"eval_per_class": -5},
    {"augment_copies": 1.5}, {"create_pr": True}, {"refit_lam": 0.0}, {"refit_lam": math.nan},
])
def test_bad_values_are_usage_errors(bad):
    with pytest.raises(UsageError):
        CleanOptions(data="mnist", **bad)
    method_bad = {k: v for k, v in bad.items() if k in {f.name for f in dataclasses.fields(MethodOptions)}}
    if method_bad:
        with pytest.raises(UsageError, match=next(iter(method_bad)).replace("_", "-")):
            MethodOptions(**method_bad)


@pytest.mark.parametrize("bad", [{"folds": 1}, {"lam_grid": ()}, {"lam_grid": (0.1, math.nan)}, {"flip": "yes"},
                                 {"surrogates": ()}, {"surrogates": ("patch", "curve")},
                                 {"surrogates": ("full", "full")}, {"surrogate_region": "yes"},
                                 {"choose_surrogates": 1}])
def test_bad_engine_only_values_are_usage_errors(bad):
    with pytest.raises(UsageError):
        MethodOptions(**bad)


def test_jobs_file_infinity_is_a_usage_error():
    with pytest.raises(UsageError, match="per_class"):
        CleanOptions.from_dict({"data": "mnist", "per_class": math.inf})
    with pytest.raises(UsageError, match="lam"):
        CleanOptions.from_dict({"data": "mnist", "lam": "nan"})


def test_clean_rejects_an_unknown_knob_by_name():
    model = timm.create_model("resnet10t", num_classes=10, pretrained=False)
    data = load_images("cifar10-samples")
    with pytest.raises(UsageError, match="'unknown'"):
        agme_hub.clean(model, data, trigger="badnets-white-br", target=0, unknown=1)
    with pytest.raises(UsageError, match="did you mean 'lam'"):
        agme_hub.clean(model, data, trigger="badnets-white-br", target=0, lamb=0.1)
    with pytest.raises(UsageError, match="--lam"):
        agme_hub.clean(model, data, trigger="badnets-white-br", target=0, lam=math.nan)


ROUND_TRIP = [
    CleanOptions(),
    CleanOptions(data="fashion-mnist", per_class=5, eval_per_class=20, lam=0.1, layers=("fc",), out="out dir/x"),
    CleanOptions(data="./imgs", trigger="blend:alpha=0.2", target="0", repair=False, layers=("layer4.*", "fc"),
                 gamma=2.5, seed=7),
    CleanOptions(data="mnist", trigger="badnets-white-br", refit_classifier=False, refit_lam=0.01),
    CleanOptions(data="mnist", eval_data="x.npz", target="cat", bn_stats="recompute", inversion_steps=50,
                 augment_copies=0, target_weight=2.5, push_to="org/m", create_pr=True, private=True, offline=True,
                 allow_pickle=True, revision="v1", lam=1e-05),
]


@pytest.mark.parametrize("options", ROUND_TRIP)
def test_to_cli_args_round_trips_through_the_cli(options, monkeypatch):
    seen = []

    def run_clean(source, parsed, **kwargs):
        seen.append((source, parsed))
        raise typer.Exit(0)  # the options are what this test is about: stop before any work

    monkeypatch.setattr(agme_hub, "run_clean", run_clean)
    args = options.to_cli_args("org/model@v2")
    assert args[:2] == ["clean", "org/model@v2"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert seen == [("org/model@v2", options)]


def test_to_cli_args_leaves_out_secrets_and_how_to_run():
    options = CleanOptions(data="mnist", token="hf_abcdefghijkl", yes=True, dry_run=True, per_class=3)
    assert options.to_cli_args("m") == ["clean", "m", "--data", "mnist", "--per-class", "3"]
    assert shlex.join(["agme", *CleanOptions(data="a b", repair=False).to_cli_args("s")]) == \
        "agme clean s --data 'a b' --no-repair"


def test_device_and_batch_size_reach_the_run_but_not_the_reproduce_command(monkeypatch):
    seen = []

    def run_clean(source, parsed, **kwargs):
        seen.append(parsed)
        raise typer.Exit(0)

    monkeypatch.setattr(agme_hub, "run_clean", run_clean)
    result = runner.invoke(cli.app, ["clean", "m", "--data", "mnist", "--device", "CUDA:1", "--batch-size", "64"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (seen[0].device, seen[0].batch_size) == ("cuda:1", 64)  # a spec is checked, not probed, here
    assert seen[0].to_cli_args("m") == ["clean", "m", "--data", "mnist"]  # the command runs on any machine
    from_jobs = CleanOptions.from_dict({"data": "mnist", "device": "mps", "batch-size": 16})
    assert (from_jobs.device, from_jobs.batch_size) == ("mps", 16)
    assert "Runtime" in runner.invoke(cli.app, ["clean", "--help"], terminal_width=200).output
