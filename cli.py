"""agme's command line: a thin Typer layer over the ``agme_hub`` Python API.

Every command parses flags, calls one API function, and renders the result (rich on stderr, JSON on
stdout with ``--json``). Errors become one line on stderr and the error's exit code.
"""

from __future__ import annotations

import signal
import sys
import threading


def _interrupted_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write("error: interrupted while starting; nothing was done\n")
    raise SystemExit(130)


# Importing torch, timm and huggingface_hub takes seconds: a Ctrl-C then must not print a 70-line traceback.
# The handler is put back as it was once the imports below are done.
_SIGINT_BEFORE_IMPORTS = (signal.signal(signal.SIGINT, _interrupted_while_starting)
                          if threading.current_thread() is threading.main_thread() else None)

import contextlib
import dataclasses
import functools
import inspect
import json
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import agme_hub as api
from agme_hub import batch as batch_api
from agme_hub.lab import bench as bench_api
from agme_hub.options import cli_flags, option_help

if _SIGINT_BEFORE_IMPORTS is not None:
    signal.signal(signal.SIGINT, _SIGINT_BEFORE_IMPORTS)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Remove backdoors from image classifiers by activation-guided model editing.")
err_console = Console(stderr=True)
HELP = option_help()

# Reusable parameter types, with the flag names of the `hf` CLI where they exist.
SourceArg = Annotated[str, typer.Argument(help="Hub repo id (org/name[@rev], hf-hub:...), timm name or local folder.")]
DataOpt = Annotated[str, typer.Option("--data", help=HELP["data"])]
TriggerOpt = Annotated[Optional[str], typer.Option("--trigger", help=HELP["trigger"])]
TargetOpt = Annotated[Optional[str], typer.Option("--target", help=HELP["target"])]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help=HELP["revision"])]
TokenOpt = Annotated[Optional[str], typer.Option("--token", help=HELP["token"])]
PrivateOpt = Annotated[bool, typer.Option("--private", help=HELP["private"])]
CreatePrOpt = Annotated[bool, typer.Option("--create-pr", help=HELP["create_pr"])]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help=HELP["offline"])]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help=HELP["allow_pickle"], rich_help_panel="Dangerous")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="Show details (and tracebacks on errors).")]
DeviceOpt = Annotated[str, typer.Option("--device", help=HELP["device"], rich_help_panel="Runtime")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", help=HELP["batch_size"], rich_help_panel="Runtime")]


def _fail(message: str, code: int) -> None:
    # escape: a message may hold brackets (agme[transformers]) that rich would read as markup and drop
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map agme's errors to one line and their exit code; anything unexpected to one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _hub_progress_bars(err_console.is_terminal):
                return func(*args, **kwargs)
        except api.errors.AgmeError as err:
            if api.constants.is_debug():
                raise
            _fail(_scrub(api.errors.one_line(err), kwargs.get("token")), err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; no output was left half-written", 130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as err:  # a bug or an unmapped library error: still one line
            if api.constants.is_debug():
                raise
            first = api.errors.one_line(err) if str(err).strip() else ""
            _fail(_scrub(f"{type(err).__name__}: {first} (set AGME_DEBUG=1 for a traceback)", kwargs.get("token")), 1)

    return wrapper


def _scrub(message: str, token: Any) -> str:
    """Remove every token agme can resolve (--token, HF_TOKEN, the saved login) from a message: errors of
    other libraries may quote the Authorization header back."""
    return api.redact.scrub(message, api.redact.known_tokens(token if isinstance(token, str) else None))


@contextlib.contextmanager
def _hub_progress_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's download bars, off while stderr is not a terminal (logs, pipes, captured output).

    Like agme's own progress lines: otherwise they precede the one-line error message in every log.
    ``HF_HUB_DISABLE_PROGRESS_BARS`` (set either way) keeps priority.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if show or are_progress_bars_disabled():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF_HUB_DISABLE_PROGRESS_BARS=0 wins and warns; that is fine
        disable_progress_bars()
    try:
        yield
    finally:
        if are_progress_bars_disabled():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable_progress_bars()


def _progress(enabled: bool) -> Callable[[str], None]:
    quiet = not enabled or not err_console.is_terminal
    return (lambda line: None) if quiet else (lambda line: err_console.log(line))


class _StageBars:
    """Per-stage progress bars on stderr (count, total, rate), fed by the engine's ``progress`` callback.

    Off under ``--json`` and when stderr is not a terminal, like the progress lines.
    """

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.tasks: dict[str, Any] = {}
        self.bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                             console=err_console, transient=True) if enabled and err_console.is_terminal else None

    def __enter__(self) -> "_StageBars":
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bars is not None:
            self.bars.stop()

    def __call__(self, event: Any) -> None:
        if self.bars is None:
            return
        if event.stage not in self.tasks:
            self.tasks[event.stage] = self.bars.add_task(event.stage, total=event.total, unit=event.unit, rate="")
        task_id = self.tasks[event.stage]
        task = next(t for t in self.bars.tasks if t.id == task_id)
        if event.done < task.completed:  # a stage that runs again (the capture of a later edited layer)
            self.bars.reset(task_id, total=event.total)
        self.bars.update(task_id, completed=event.done, total=event.total)
        speed = task.speed
        self.bars.update(task_id, rate=f"{speed:,.1f}/s" if speed else "")


_pct = api.report.format_percent


def _metrics_table(before: Any, after: Any, title: str) -> Table:
    table = Table(title=title)
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, label in api.report.HEADLINE_METRICS:
        b, a = before.get(key), after.get(key)
        table.add_row(label, _pct(b), _pct(a), api.report.format_change(b, a))
    return table


def _emit_json(record: Any) -> None:
    values = record.to_json() if hasattr(record, "to_json") else record
    sys.stdout.write(json.dumps(values, indent=2, default=str) + "\n")


def with_option_flags(options_class: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one flag per field of ``options_class`` (a dataclass), generated from the fields.

    The command takes them as ``**flags``; the flag's names come from :func:`agme_hub.options.cli_flags`,
    its help and panel from the field's ``help`` and ``group`` metadata, its type from the annotation
    (a tuple is a repeatable flag). Adding a field to the options adds its flag.
    """
    hints = typing.get_type_hints(options_class)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                       annotation=Annotated[_flag_type(hints[f.name], f.metadata),
                                                            typer.Option(*cli_flags(f), help=f.metadata["help"],
                                                                         rich_help_panel=f.metadata["group"])])
                     for f in dataclasses.fields(options_class)]
        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
        command.__signature__ = inspect.Signature(positional + generated + keyword)  # type: ignore[attr-defined]
        return command

    return decorate


def _flag_type(hint: Any, metadata: Any) -> Any:
    """The type click parses a field's flag as: tuples become repeatable lists; ``path`` fields are Paths."""
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is tuple:
        base = list[typing.get_args(base)[0]]
    elif metadata.get("path"):
        base = Path
    return Optional[base] if optional else base


def _options_from_flags(options_class: type, flags: dict[str, Any]) -> Any:
    """The options from parsed flags: a repeated flag given no times is None, a Path its text."""
    values = {name: (tuple(value) or None) if isinstance(value, list) else str(value) if isinstance(value, Path)
              else value for name, value in flags.items()}
    return options_class(**values)


@app.command(rich_help_panel="Main")
@handle_errors
@with_option_flags(api.CleanOptions)
def clean(source: SourceArg, *, as_json: JsonOpt = False, verbose: VerboseOpt = False, **flags: Any) -> None:
    """Pull SOURCE, remove its backdoor, write safetensors + config + model card, and optionally push."""
    options = _options_from_flags(api.CleanOptions, flags)
    with _StageBars(not as_json) as bars:
        record = api.run_clean(source, options, report=_progress(not as_json), progress=bars)
    _render_clean(record, as_json=as_json, verbose=verbose)


def _render_clean(report: Any, *, as_json: bool, verbose: bool = False) -> None:
    if as_json:
        _emit_json(report)
        return
    if report.status == "dry-run":
        err_console.print(f"[bold]dry run[/]: {report.source} @ {report.revision or 'local folder'}")
        for group, names in (report.candidate_layers or {}).items():
            err_console.print(f"  candidate layers ({group}): {', '.join(names)}")
        err_console.print(f"  would write to {report.output_dir}: {', '.join(report.files or [])}")
        if report.push is not None:
            err_console.print(f"  would push to {report.push.repo_id}"
                              f"{' as a pull request' if report.push.create_pr else ''}")
        return
    target, method = report.target, report.method
    err_console.print(_metrics_table(report.before, report.after,
                                     f"{report.source}: {report.n_edit_images} clean images, "
                                     f"mode {report.mode}, target {target.index} ({target.label})"))
    if report.asr_trigger == "surrogate":
        err_console.print("attack success measured with the reconstructed surrogate trigger, not the real one")
    if target.detected and target.anomaly_index is not None:
        err_console.print(f"detected target {target.index} (anomaly index {target.anomaly_index}; "
                          f"> 2 is an outlier); confirm with --target")
    if target.evidence is False:
        err_console.print(f"no evidence of a backdoor: the model was written unchanged ({method.selection}); "
                          "pass --target to edit anyway")
    else:
        err_console.print(f"edited {', '.join(method.layers or [])} with lam={method.lam:g}, gamma={method.gamma:g}; "
                          f"{method.selection}")
    err_console.print(f"took {report.timing['total']:.1f} s")
    if verbose:
        err_console.print(report.timing)
    if report.push is not None:
        err_console.print(f"pushed: {report.push.url or report.push.reason}")
    err_console.print(f"output: {report.output_dir}")


@app.command("inspect", rich_help_panel="Main")  # not named inspect: that is the module the options use
@handle_errors
def inspect_command(source: SourceArg, revision: RevisionOpt = None, token: TokenOpt = None, offline: OfflineOpt = False,
                    allow_pickle: PickleOpt = False, as_json: JsonOpt = False) -> None:
    """Show a checkpoint's format, architecture, classes, license, files and the layers agme would edit."""
    info = api.inspect_source(source, revision=revision, token=token, offline=offline, allow_pickle=allow_pickle)
    if as_json:
        _emit_json(info)
        return
    table = Table(title=f"{source}", show_header=False)
    for key in ("format", "architecture", "revision", "num_classes", "license", "input_size"):
        table.add_row(key, str(getattr(info, key)))
    table.add_row("classes", ", ".join(info.label_names[:12]) + (" ..." if len(info.label_names) > 12 else ""))
    table.add_row("files", ", ".join(info.files))
    for group, names in info.candidate_layers.items():
        table.add_row(f"layers: {group}", ", ".join(names))
    table.add_row("choice", f"made by `agme clean`: {api.constants.DEFAULT_FOLDS}-fold cross-validation on the edit images over these groups "
                  "and lam (or --layers/--lam)")
    err_console.print(table)


@app.command("eval", rich_help_panel="Main")
@handle_errors
def eval_(source: SourceArg, data: DataOpt = "", trigger: TriggerOpt = None, target: TargetOpt = None,
          revision: RevisionOpt = None, token: TokenOpt = None, offline: OfflineOpt = False,
          allow_pickle: PickleOpt = False, device: DeviceOpt = "auto", batch_size: BatchSizeOpt = None,
          as_json: JsonOpt = False) -> None:
    """Measure clean accuracy, attack success, target-class and robust accuracy; change nothing."""
    with _StageBars(not as_json) as bars:
        record = api.evaluate_source(source, data=data, trigger=trigger, target=target, revision=revision,
                                     token=token, offline=offline, allow_pickle=allow_pickle, device=device,
                                     batch_size=batch_size, progress=bars)
    if as_json:
        _emit_json(record)
        return
    table = Table(title=f"{source} on {record.data} ({record.metrics['n_images']} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, _ in api.report.HEADLINE_METRICS:
        table.add_row(key.replace("_", " "), _pct(record.metrics[key]))
    err_console.print(table)


@app.command(rich_help_panel="Main")
@handle_errors
def scan(source: SourceArg, data: DataOpt = "",
         per_class: Annotated[Optional[int], typer.Option("--per-class", help="Clean images per class to scan with "
                                                          "(default: all of --data).")] = None,
         report: Annotated[Optional[Path], typer.Option("--report", help="Write scan_report.json and the surrogate "
                                                        "triggers (PNG) to this folder.")] = None,
         yes: Annotated[bool, typer.Option("--yes", "-y", help="Replace a --report folder agme did not write.")] = False,
         seed: Annotated[int, typer.Option("--seed", help=HELP["seed"])] = 0,
         revision: RevisionOpt = None, token: TokenOpt = None, offline: OfflineOpt = False,
         allow_pickle: PickleOpt = False, device: DeviceOpt = "auto", batch_size: BatchSizeOpt = None,
         as_json: JsonOpt = False) -> None:
    """Is this model backdoored? Detect only, change nothing. Exit 40 when a backdoor is suspected, 0 when not."""
    with _StageBars(not as_json) as bars:
        result = api.scan(source, data=data, per_class=per_class, report_dir=report, yes=yes, seed=seed,
                          revision=revision, token=token, offline=offline, allow_pickle=allow_pickle, device=device,
                          batch_size=batch_size, progress=bars)
    if as_json:
        _emit_json(result)
    else:
        table = Table(title=f"{source}: {result.verdict}")
        columns, rows = result.table()
        for column in columns:
            table.add_column(column, justify="left" if column == "label" else "right")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        err_console.print(table)
        for line in result.evidence_lines():
            err_console.print(escape(line))
        if result.report_dir:
            err_console.print(f"report: {result.report_dir}")
    if result.backdoor_suspected:
        raise typer.Exit(api.constants.BACKDOOR_SUSPECTED_EXIT_CODE)


@app.command(rich_help_panel="Hub")
@handle_errors
def push(folder: Annotated[Path, typer.Argument(help="An agme output folder.")],
         repo_id: Annotated[str, typer.Argument(help="Target Hub repo, ORG/NAME.")],
         create_pr: CreatePrOpt = False, private: PrivateOpt = False, token: TokenOpt = None,
         as_json: JsonOpt = False) -> None:
    """Publish an output folder to the Hub in one commit (a pull request if a foreign README is there)."""
    report = api.push(folder, repo_id, token=token, private=private, create_pr=create_pr)
    if as_json:
        _emit_json(report.push)
        return
    err_console.print(report.push.url or report.push.reason)


@app.command(rich_help_panel="Hub")
@handle_errors
def card(folder: Annotated[Path, typer.Argument(help="An agme output folder.")],
         yes: Annotated[bool, typer.Option("--yes", "-y", help="Replace a README.md that agme did not write.")] = False,
         ) -> None:
    """Re-render the model card of an output folder from its agme_report.json, and validate it."""
    path = api.rerender_card(folder, overwrite=yes)
    err_console.print(f"card written and valid: {path}")


@app.command("backdoor-train", rich_help_panel="Lab")
@handle_errors
def backdoor_train(
    out: Annotated[Path, typer.Option("--out", help="Output folder (timm or transformers format, see --format).")],
    dataset: Annotated[str, typer.Option("--dataset", help="Built-in dataset: fashion-mnist, mnist.")] = "fashion-mnist",
    arch: Annotated[str, typer.Option("--arch", help="A timm architecture name; with --format transformers: vit, "
                                                     "convnext, resnet or a ...ForImageClassification class.")] = "resnet18",
    trigger: Annotated[str, typer.Option("--trigger", help="Trigger spec or preset.")] = "badnets-white-br",
    target: Annotated[int, typer.Option("--target", help="Target class (all-to-one).")] = 0,
    poison_rate: Annotated[float, typer.Option("--poison-rate", help="Fraction of training images poisoned.")] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs")] = 2,
    per_class: Annotated[Optional[int], typer.Option("--per-class", help="Training images per class (all if omitted).")] = None,
    img_size: Annotated[int, typer.Option("--img-size")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Replace an existing --out folder.")] = False,
    model_format: Annotated[str, typer.Option("--format", help="timm, or transformers (needs the transformers extra of agme).")
                            ] = "timm",
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training images per step.",
                                            rich_help_panel="Runtime")] = api.BackdoorConfig.batch_size,
    as_json: JsonOpt = False,
) -> None:
    """Train a backdoored timm or transformers model on real offline data (for tests, benchmarks and demos)."""
    config = api.BackdoorConfig(dataset=dataset, arch=arch, trigger=trigger, target=target, poison_rate=poison_rate,
                                epochs=epochs, seed=seed, n_train=per_class, img_size=img_size, format=model_format,
                                batch_size=batch_size)
    run_on = api.devices.resolve_device(device)  # before anything is written
    if out.exists() and any(out.iterdir()) and not yes:
        raise api.errors.OutputExistsError(f"{out} exists; choose another --out or pass --yes")
    result = api.train_backdoored(config, out_dir=out, progress=not as_json and err_console.is_terminal, overwrite=yes,
                                  device=str(run_on))
    record = {"output_dir": str(out), "metrics": result.metrics.as_dict(), "train_seconds": round(result.train_seconds, 1)}
    if as_json:
        _emit_json(record)
        return
    err_console.print(f"clean accuracy {_pct(result.metrics.clean_accuracy)}, attack success "
                      f"{_pct(result.metrics.attack_success_rate)} after {result.train_seconds:.0f} s; saved to {out}")


@app.command(rich_help_panel="Main")
@handle_errors
def demo(
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder of the cleaned model.")] = None,
    per_class: Annotated[int, typer.Option("--per-class", help=HELP["per_class"])] = 10,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The embedded default job, offline: backdoor a ResNet on Fashion-MNIST, clean it, show before/after."""
    with _StageBars(not as_json) as bars:
        record = api.run_demo(out=out, per_class=per_class, report=_progress(not as_json), device=device,
                              batch_size=batch_size, progress=bars)
    _render_clean(record, as_json=as_json)


@app.command(rich_help_panel="Main")
@handle_errors
def batch(
    jobs_file: Annotated[Path, typer.Argument(help="YAML or JSON: 'defaults' plus 'jobs', each entry a 'source', "
                                                   "an optional 'name' and the options of `agme clean`.")],
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Jobs at a time: local worker processes "
                                                "(default 1); with Ray, tasks in flight (default: its CPUs).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip jobs whose output is complete (report and weights "
                                         "sha256 agree); push complete ones not pushed yet.")] = False,
    continue_on_error: Annotated[bool, typer.Option("--continue-on-error", help="Record a failed job and go on "
                                                    "(default: start no new job after a failure).")] = False,
    backend: Annotated[str, typer.Option("--backend", help="local (worker processes) or ray (tasks on a Ray "
                                         "cluster).")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS "
                                                   "or the cluster started on this machine).")] = None,
    out_root: Annotated[Optional[Path], typer.Option("--out-root", help="Folder of the job folders and of "
                                                     "summary.json/.csv (default ./<JOBS_FILE stem>-agme).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Clean many models from a jobs file, N at a time and resumably; each job gets a folder and a log."""
    job_list = batch_api.load_jobs(jobs_file)
    live = not as_json and err_console.is_terminal
    with _LiveBatch(live) as table:
        summary = batch_api.run(job_list, out_root=out_root or Path.cwd() / f"{jobs_file.stem}-agme", workers=jobs,
                                resume=resume, continue_on_error=continue_on_error, backend=backend,
                                address=address, on_update=table.update)
    _render_batch(summary, as_json=as_json, table_shown=live)
    if not summary.ok:
        raise typer.Exit(api.errors.BatchFailedError.exit_code)


class _LiveBatch:
    """A live table of the jobs on stderr while ``batch.run`` runs; ``update`` is its ``on_update`` callback."""

    def __init__(self, enabled: bool) -> None:
        from rich.live import Live

        self.states: list[Any] = []
        self.live = Live(console=err_console, get_renderable=lambda: _batch_table(self.states),
                         refresh_per_second=4) if enabled else None

    def __enter__(self) -> "_LiveBatch":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, states: Any) -> None:
        self.states[:] = states


def _batch_table(states: Any) -> Table:
    import time

    table = Table(title="agme batch")
    for column in ("job", "status", "clean acc.", "attack success", "time", "detail"):
        table.add_column(column, justify="right" if column in ("clean acc.", "attack success", "time") else "left")
    colours = {"complete": "green", "skipped": "green", "failed": "red", "running": "yellow"}
    for job in states:
        def change(key: str) -> str:
            if not job.before or not job.after:
                return ""
            return f"{_pct(job.before.get(key))} -> {_pct(job.after.get(key))}"
        seconds = job.seconds if job.seconds is not None or job.started_at is None else time.time() - job.started_at
        detail = job.error or job.push_url or (job.stage if job.status == "running" else "")
        table.add_row(job.name, f"[{colours.get(job.status, 'default')}]{job.status}[/]", change("clean_accuracy"),
                      change("attack_success_rate"), "" if seconds is None else f"{seconds:.0f} s", detail)
    return table


def _render_batch(summary: Any, *, as_json: bool, table_shown: bool) -> None:
    if as_json:
        _emit_json(summary.as_dict())
        return
    if not table_shown:
        err_console.print(_batch_table(summary.jobs))
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts.items())
    err_console.print(f"{counts} in {summary.wall_seconds:.0f} s ({summary.models_per_minute:.1f} models/min); "
                      f"summary: {Path(summary.out_root) / 'summary.json'} and summary.csv")


# The columns of the bench's headline that fit a terminal (table.md has them all).
_BENCH_COLUMNS = ("defence", "knows", "cells run", "CA change (pt)", "ASR %", "TA change (pt)", "DER", "best DER",
                  "median s", "time / agme-bdk")


@app.command(rich_help_panel="Lab")
@handle_errors
def bench(
    out: Annotated[Path, typer.Option("--out", help="Folder for runs.csv, runs.json, table.md and the plots.")] = Path("bench-results"),
    quick: Annotated[bool, typer.Option("--quick", help="The small grid: under 10 minutes on 2 CPU cores, training included.")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Number of seeds (0..N-1).")] = None,
    datasets: Annotated[Optional[list[str]], typer.Option("--datasets", help="Override: fashion-mnist, mnist (repeat).")] = None,
    archs: Annotated[Optional[list[str]], typer.Option("--archs", help="Override: resnet10t, convnext, mobilenetv3, efficientnet, vit, lite0-pretrained (repeat).")] = None,
    triggers: Annotated[Optional[list[str]], typer.Option("--triggers", help="Override: preset names, blend, image, additive, lsb, sig, warp or specs (repeat).")] = None,
    budgets: Annotated[Optional[list[int]], typer.Option("--budgets", help="Override: clean images per class (repeat).")] = None,
    defences: Annotated[Optional[list[str]], typer.Option("--defences", help="Override: agme-bdk, agme-nobdk, ..., ft, fp, clp, nc, ftsam (repeat).")] = None,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (1 is fastest for these small models on a shared CPU).")] = 1,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="Where agme and the forward-pass floor run: auto, cpu, cuda, cuda:N or mps (default: the CPU; "
                         "baselines run on the CPU).", rich_help_panel="Runtime")] = None,
    batch_size: BatchSizeOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore the rows an interrupted run left in --out.")] = False,
    ablation: Annotated[bool, typer.Option("--ablation", help="The paper's Figure 4 instead of the grid: CA, ASR and TA "
                                           "against lam and gamma, BatchNorm averages kept and recomputed, on one model "
                                           "(the first of --archs, --triggers, --budgets; default resnet10t, "
                                           "badnets-white-br, 10 per class).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Benchmark AGME against FT, FP, CLP, NC and FT-SAM on real offline data; write a table and plots."""
    if ablation:
        _bench_ablation(out, datasets=datasets, archs=archs, triggers=triggers, budgets=budgets, threads=threads,
                        as_json=as_json)
        return
    base = bench_api.BenchConfig.quick() if quick else bench_api.BenchConfig.full()
    config = bench_api.config_with(
        base, seeds=tuple(range(seeds)) if seeds else None, datasets=tuple(datasets) if datasets else None,
        archs=tuple(archs) if archs else None, triggers=tuple(triggers) if triggers else None,
        budgets=tuple(budgets) if budgets else None, defences=tuple(defences) if defences else None, threads=threads,
        device=device, batch_size=batch_size)
    if config.device is not None:
        api.devices.resolve_device(config.device)  # a missing GPU fails before any training
    say = _progress(not as_json)
    rows = bench_api.run_bench(config, out, command="agme " + " ".join(sys.argv[1:]), resume=not fresh, say=say,
                               on_row=lambda r: say(f"  {r['defence']:<20} {r['per_class']:>3}/class  {r['status']:<14} "
                                                    f"ASR {_pct(r.get('asr'))}  CA {_pct(r.get('ca'))}  "
                                                    f"{r.get('seconds') or 0:.1f} s"))
    summary = bench_api.headline(rows)
    if as_json:
        _emit_json({"output_dir": str(out), "table": str(out / "table.md"), "runs": len(rows), "headline": summary})
        return
    header, cells = bench_api.headline_rows(rows)  # the headline of table.md, fewer columns
    shown = [header.index(column) for column in _BENCH_COLUMNS]
    table = Table(title=f"agme bench ({len(rows)} runs): means over cells whose backdoor took")
    for i in shown:
        table.add_column(header[i], justify="left" if header[i] in ("defence", "knows") else "right")
    for row in cells:
        table.add_row(*(row[i] for i in shown))
    err_console.print(table)
    err_console.print(f"table: {out / 'table.md'}")


def _bench_ablation(out: Path, *, datasets: list[str] | None, archs: list[str] | None, triggers: list[str] | None,
                    budgets: list[int] | None, threads: int, as_json: bool) -> None:
    """``agme bench --ablation``: one model of the quick grid's recipe, lam and gamma swept (lab/bench/ablation.py)."""
    config = bench_api.AblationConfig(bench=bench_api.BenchConfig.quick(threads=threads),
                                      **{k: v[0] for k, v in (("dataset", datasets), ("arch", archs),
                                                              ("trigger", triggers), ("per_class", budgets)) if v})
    rows = bench_api.run_ablation(config, out, command="agme " + " ".join(sys.argv[1:]), say=_progress(not as_json))
    if not as_json:
        return err_console.print(f"{len(rows)} points; table: {out / 'ablation.md'}; figure: {out / 'ablation.png'}")
    _emit_json({"output_dir": str(out), "table": str(out / "ablation.md"), "plot": str(out / "ablation.png"), "rows": rows})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
