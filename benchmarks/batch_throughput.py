"""Throughput of ``agme batch``: models cleaned per minute with 1 and with 2 local workers, in the same run.

Trains (once, cached under ``AGME_CACHE``) N small backdoored ResNets on Fashion-MNIST, then runs the same
batch of N jobs with ``--jobs 1`` and ``--jobs 2`` into fresh folders and prints models per minute for each.
The wall time counts everything a user waits for, the start of the worker processes included.

    python benchmarks/batch_throughput.py                 # 6 models, the method defaults of `agme clean`
    python benchmarks/batch_throughput.py --quick         # cheap options (lam 0.1 on fc, 5 images per class)
    python benchmarks/batch_throughput.py --models 8 --threads 1 --json

Each job runs torch on ``--threads`` threads, so 2 workers use twice the cores of 1: on a machine whose cores
are busy with other work, the speed-up is smaller than 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False)

# Small backdoored models, seconds each to train (as in tests/test_batch.py).
TRAINING = dict(dataset="fashion-mnist", arch="resnet10t", model_args={"channels": [16, 32, 64, 128]},
                n_train=100, n_test=30, epochs=5, img_size=16, poison_rate=0.3, lr=3e-3)
TRIGGERS = ("badnets-white-br", "badnets-red-tr", "badnets-bar-bl", "badnets-checker-br")
QUICK = {"per_class": 5, "eval_per_class": 20, "lam": 0.1, "layers": ["fc"], "augment_copies": 1}
DEFAULT = {"per_class": 10, "eval_per_class": 50}  # lam and layers by cross-validation, as `agme clean` does


def _models(count: int) -> list[tuple[Path, str, int]]:
    """``count`` backdoored models (trigger and target vary), trained once and cached."""
    import torch

    from agme_hub.lab.backdoor import BackdoorConfig, train_backdoored
    from agme_hub.constants import WEIGHTS_NAME, cache_dir

    torch.set_num_threads(1)
    models = []
    for index in range(count):
        trigger, target = TRIGGERS[index % len(TRIGGERS)], index % 10
        settings = {**TRAINING, "trigger": trigger, "target": target, "seed": index}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        folder = cache_dir() / "bench-batch" / f"{trigger}-t{target}-{key}"
        if not (folder / WEIGHTS_NAME).is_file():
            print(f"training {folder.name} ...", flush=True)
            train_backdoored(BackdoorConfig(**settings), out_dir=folder, overwrite=True)
        models.append((folder, trigger, target))
    return models


@app.command()
def main(
    models: Annotated[int, typer.Option("--models", help="Jobs in the batch.")] = 6,
    workers: Annotated[list[int], typer.Option("--workers", help="Worker counts to compare (repeat).")] = [1, 2],
    threads: Annotated[int, typer.Option("--threads", help="torch threads per worker.")] = 1,
    quick: Annotated[bool, typer.Option("--quick", help="Cheap clean options (about a second per job).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    from agme_hub import batch
    from agme_hub.options import CleanOptions

    options = QUICK if quick else DEFAULT
    jobs = [batch.Job(str(folder), CleanOptions.from_dict({"data": "fashion-mnist", "trigger": trigger,
                                                           "target": target, **options}), name=f"m{i}")
            for i, (folder, trigger, target) in enumerate(_models(models))]
    runs: list[dict[str, Any]] = []
    for count in workers:
        with tempfile.TemporaryDirectory(prefix="agme-batch-bench-") as root:
            summary = batch.run(jobs, out_root=root, workers=count, threads_per_worker=threads)
        if not summary.ok:
            failed = [f"{job.name}: {job.error}" for job in summary.jobs if not job.ok]
            raise SystemExit(f"the batch failed: {failed}")
        seconds = [job.seconds for job in summary.jobs if job.seconds is not None]
        runs.append({"workers": count, "threads_per_worker": threads, "models": len(jobs),
                     "wall_seconds": round(summary.wall_seconds, 2),
                     "models_per_minute": round(summary.models_per_minute, 2),
                     "mean_job_seconds": round(sum(seconds) / len(seconds), 2)})
        if not as_json:
            print(f"{count} worker(s): {len(jobs)} models in {summary.wall_seconds:.1f} s = "
                  f"{summary.models_per_minute:.1f} models/min (mean job {runs[-1]['mean_job_seconds']:.1f} s)",
                  flush=True)
    record = {"options": "quick" if quick else "default", "clean_options": options, "runs": runs,
              "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if len(runs) > 1:
        record["speedup"] = round(runs[-1]["models_per_minute"] / runs[0]["models_per_minute"], 2)
    if as_json:
        print(json.dumps(record, indent=2))
    elif "speedup" in record:
        print(f"speed-up of {runs[-1]['workers']} workers over {runs[0]['workers']}: {record['speedup']:.2f}x "
              f"(load average {record['load_average'][0]} on {os.cpu_count()} cores)")


if __name__ == "__main__":  # required: the workers are spawned processes that import this file
    app()
