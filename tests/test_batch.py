"""agme batch: jobs files, local worker processes, resume, Ctrl-C, the Ray backend and the CLI.

Every batch here cleans real backdoored models (small ResNets trained on Fashion-MNIST by the ``backdoored``
fixture) with cheap options, so that a job takes about a second once its worker is up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from agme_hub import batch
from agme_hub.app.batch import Job, JobResult
from agme_hub.hub.checkpoint import sha256_file
from agme_hub.constants import REPORT_NAME, WEIGHTS_NAME
from agme_hub.errors import BatchFailedError, JobsFileError, UsageError
from cli import app

torch.set_num_threads(1)  # the tests share two cores with other processes

REPO_ROOT = Path(__file__).resolve().parents[1]
# Cheaper than the default test training (seconds per model): 16-pixel inputs, fewer images, more poison;
# ~55% clean accuracy and a backdoor that fires on ~90% of triggered images.
TRAINING = dict(n_train=100, n_test=30, epochs=5, img_size=16, poison_rate=0.3)
MODELS = {"white": ("badnets-white-br", 0), "red": ("badnets-red-tr", 1), "bar": ("badnets-bar-bl", 2)}
CHEAP = {"data": "fashion-mnist", "per_class": 5, "eval_per_class": 20, "lam": 0.1, "layers": ["fc"],
         "augment_copies": 1}


@pytest.fixture(scope="module")
def models(backdoored, tmp_path_factory):
    """{name: (folder, trigger, target)} of three real backdoored models, and 'broken': one with truncated weights."""
    found = {name: (backdoored(trigger, target=target, **TRAINING).out_dir, trigger, target)
             for name, (trigger, target) in MODELS.items()}
    broken = tmp_path_factory.mktemp("broken") / "broken"
    shutil.copytree(found["white"][0], broken)
    weights = broken / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    found["broken"] = (broken, "badnets-white-br", 0)
    return found


def _entry(models, name: str, **extra) -> dict:
    folder, trigger, target = models[name]
    return {"source": str(folder), "name": name, "trigger": trigger, "target": target, **extra}


def _write_jobs(path: Path, entries: list) -> Path:
    path.write_text(yaml.safe_dump({"defaults": CHEAP, "jobs": entries}))
    return path


@pytest.fixture(scope="module")
def local_batch(models, tmp_path_factory):
    """Four real backdoored models, one of them a deliberately broken source, on two workers, --continue-on-error."""
    root = tmp_path_factory.mktemp("local")
    names = ["white", "broken", "red", "bar"]
    jobs = batch.load_jobs(_write_jobs(root / "jobs.yaml", [_entry(models, n) for n in names]))
    seen: list[tuple[JobResult, ...]] = []
    summary = batch.run(jobs, out_root=root / "out", workers=2, continue_on_error=True, threads_per_worker=1,
                        on_update=seen.append)
    return jobs, summary, root / "out", seen


def _leftovers(root: Path) -> list[Path]:
    """Half-written things: temporary folders of atomic writes, or a model folder without a complete report."""
    found = [p for p in root.rglob(".*") if p.name != ".agme-batch.lock"]
    for model_dir in root.glob(f"*/{batch.MODEL_DIR}"):
        report = json.loads((model_dir / REPORT_NAME).read_text()) if (model_dir / REPORT_NAME).is_file() else {}
        if report.get("status") != "complete" or report["provenance"]["weights_sha256"] != sha256_file(
                model_dir / WEIGHTS_NAME):
            found.append(model_dir)
    return found


# ---------------------------------------------------------------------------------------- local batch
def test_two_workers_broken_source_fails_cleanly_the_rest_complete(local_batch):
    jobs, summary, out, seen = local_batch
    status = {job.name: job.status for job in summary.jobs}
    assert status == {"white": "complete", "broken": "failed", "red": "complete", "bar": "complete"}
    assert not summary.ok and summary.workers == 2
    broken = summary.jobs[1]
    assert broken.exit_code is not None and broken.error and "\n" not in broken.error
    assert "Traceback" in (out / "broken" / "job.log").read_text()  # the details are in the job's log
    assert not (out / "broken" / batch.MODEL_DIR).exists()
    # Jobs ran in worker processes, not here, and on at most two of them. Not "exactly two": on a loaded
    # machine one worker can finish all four one-second jobs before the other has imported torch.
    workers = {job.worker for job in summary.jobs}
    assert 1 <= len(workers) <= 2 and f":{os.getpid()}" not in " ".join(workers)
    for job in summary.jobs:
        if job.status == "complete":
            assert job.after["attack_success_rate"] < job.before["attack_success_rate"]
            report = json.loads((out / job.name / batch.MODEL_DIR / REPORT_NAME).read_text())
            assert report["status"] == "complete" and report["before"] == job.before
            assert "complete in" in (out / job.name / batch.LOG_NAME).read_text()
    assert {"running"} <= {state.status for states in seen for state in states}  # the live table saw them run
    assert _leftovers(out) == []
    # The summary, as JSON and CSV.
    written = json.loads((out / batch.SUMMARY_JSON).read_text())
    assert written["counts"] == {"complete": 3, "failed": 1} and written["ok"] is False
    assert [j["name"] for j in written["jobs"]] == [job.name for job in jobs]
    rows = (out / batch.SUMMARY_CSV).read_text().splitlines()
    assert rows[0].startswith("name,status,source,clean_accuracy_before,clean_accuracy_after")
    assert len(rows) == 5 and rows[2].startswith("broken,failed,")


def test_resume_does_no_work(local_batch, tmp_path):
    jobs, _, out, _ = local_batch
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    good = [job for job in jobs if job.name != "broken"]
    mtimes = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file() and "summary" not in p.name}
    seen: list[tuple[JobResult, ...]] = []
    start = time.perf_counter()
    summary = batch.run(good, out_root=copy, workers=2, resume=True, on_update=seen.append)
    assert time.perf_counter() - start < 5  # no worker process was even started
    assert summary.ok and summary.counts == {"skipped": 3}
    assert all(job.before and job.after for job in summary.jobs)  # the metrics come from the reports
    assert "running" not in {state.status for states in seen for state in states}
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}  # not one file rewritten


def test_resume_checks_the_weights_hash_the_options_and_the_push(local_batch, tmp_path):
    jobs, _, out, _ = local_batch
    job = jobs[0]
    model_dir = tmp_path / "model"
    shutil.copytree(out / job.name / batch.MODEL_DIR, model_dir)
    assert batch._resume_state(job, model_dir)[0] == "done"
    changed = Job(job.source, job.options.replace(lam=0.5), name=job.name)
    assert batch._resume_state(changed, model_dir)[0] == "run"
    to_push = Job(job.source, job.options.replace(push_to="org/white-agme"), name=job.name)
    assert batch._resume_state(to_push, model_dir)[0] == "push"
    weights = model_dir / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert batch._resume_state(job, model_dir) == ("run", "the weights do not match the sha256 in the report")


def test_interrupted_batch_leaves_nothing_half_written_and_resumes(models, tmp_path, hub_env):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while the second job runs; then --resume."""
    # The second job evaluates on more images (seconds), so that Ctrl-C finds it running.
    entries = [_entry(models, "white"), _entry(models, "red", eval_per_class=200),
               _entry(models, "bar", push_to="org/bar-agme")]
    jobs_file = _write_jobs(tmp_path / "jobs.yaml", entries)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cli", "batch", str(jobs_file), "--jobs", "1", "--out-root",
                                str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "red" / batch.LOG_NAME).exists():  # the second job has started
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGABRT)
            stdout, stderr = process.communicate(timeout=30)
            raise AssertionError(stderr)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and stdout == ""
    written = json.loads((out / batch.SUMMARY_JSON).read_text())
    status = {job["name"]: job["status"] for job in written["jobs"]}
    assert written["interrupted"] is True
    assert status == {"white": "complete", "red": "interrupted", "bar": "cancelled"}
    assert "interrupted" in (out / "red" / batch.LOG_NAME).read_text()
    assert _leftovers(out) == []
    assert not (out / "red" / batch.MODEL_DIR).exists() and not (out / "bar" / batch.MODEL_DIR).exists()

    summary = batch.run(jobs_file, out_root=out, workers=1, resume=True, threads_per_worker=1)
    assert summary.ok and [job.status for job in summary.jobs] == ["skipped", "complete", "complete"]
    assert summary.jobs[2].push_url and summary.jobs[2].push_url.startswith(hub_env.url)
    assert _leftovers(out) == []


def test_first_failure_stops_the_batch_and_json_goes_to_stdout(models, tmp_path):
    jobs_file = _write_jobs(tmp_path / "jobs.yaml", [_entry(models, "broken"), _entry(models, "white"),
                                                     _entry(models, "red")])
    result = CliRunner().invoke(app, ["batch", str(jobs_file), "--out-root", str(tmp_path / "out"), "--json"])
    assert result.exit_code == BatchFailedError.exit_code, result.output
    record = json.loads(result.stdout)
    assert [job["status"] for job in record["jobs"]] == ["failed", "cancelled", "cancelled"]
    assert "broken" in record["jobs"][1]["error"] and "--continue-on-error" in record["jobs"][1]["error"]
    assert not (tmp_path / "out" / "white" / batch.MODEL_DIR).exists()


# ------------------------------------------------------------------------------------------------- ray
@pytest.fixture
def ray_head(monkeypatch):
    """A local Ray head on 127.0.0.1 only, for this test."""
    # Ray replaces 127.0.0.1 by the host's own address unless its "cluster" mode is off (as on macOS); its
    # worker processes read the variable, this process the constant parsed at import.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants, services

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    assert services.get_node_ip_address() == "127.0.0.1"  # checked before anything starts
    ray.init(address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        yield ray
    finally:
        ray.shutdown()


def test_ray_backend_gives_the_same_summary(local_batch, ray_head, tmp_path):
    jobs, local, _, _ = local_batch
    summary = batch.run(jobs, out_root=tmp_path / "out", workers=2, continue_on_error=True, backend="ray",
                        threads_per_worker=1)
    assert summary.backend == "ray" and summary.counts == local.counts

    def essentials(job: JobResult) -> tuple:
        return job.name, job.status, job.before, job.after, job.exit_code, job.error

    assert [essentials(job) for job in summary.jobs] == [essentials(job) for job in local.jobs]
    assert _leftovers(tmp_path / "out") == []


def test_ray_missing_is_one_clear_error(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    jobs = [Job(str(models["white"][0]), batch.CleanOptions(data="fashion-mnist"))]
    with pytest.raises(UsageError, match="needs the ray package: pip install"):
        batch.run(jobs, out_root=tmp_path / "out", backend="ray")
    jobs_file = _write_jobs(tmp_path / "jobs.yaml", [_entry(models, "white")])
    result = CliRunner().invoke(app, ["batch", str(jobs_file), "--backend", "ray", "--out-root", str(tmp_path / "o")])
    assert result.exit_code == UsageError.exit_code
    assert "needs the ray package" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- jobs file
@pytest.mark.parametrize(("document", "message"), [
    ({"jobs": [{"source": "a", "data": "fashion-mnist", "lamb": 0.1}]},
     r"jobs\[0\] \(a\): unknown field 'lamb' \(did you mean 'lam'\?\)"),
    ({"defaults": {"data": "fashion-mnist"}, "jobs": ["a", {"source": "b", "per_class": "many"}]},
     r"jobs\[1\] \(b\): field 'per_class' has a value of the wrong type"),
    ({"defaults": {"data": "fashion-mnist"}, "jobs": ["a", {"name": "b"}]}, r"jobs\[1\]: field 'source' is required"),
    ({"jobs": ["org/a"]}, r"jobs\[0\] \(a\): field 'data' is required"),
    ({"defaults": {"data": "fashion-mnist"}, "jobs": ["org/a", "other/a"]},
     r"jobs\[1\] \(a\): name 'a' is already used by jobs\[0\]"),
    ({"defaults": {"data": "fashion-mnist"}, "jobs": [{"source": "a", "trigger": "patch:size=oops"}]},
     r"jobs\[0\] \(a\): field 'trigger'"),
    ({"defaults": {"data": "fashion-mnist", "per-clas": 3}, "jobs": ["a"]},
     r"defaults: unknown field 'per-clas' \(did you mean 'per_class'\?\)"),
    ({"defaults": {"data": "fashion-mnist"}, "jobs": [{"source": "a", "name": "../escape"}]},
     r"jobs\[0\] \(\.\./escape\): field 'name' '\.\./escape' is not a usable folder name"),
    ({"default": {}, "jobs": ["a"]}, r"unknown top-level key 'default'"),
    ({"defaults": {"data": "fashion-mnist"}, "jobs": [{"source": "a", "device": "tpu"}]},
     r"jobs\[0\] \(a\): unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    ({"jobs": []}, r"'jobs' must be a non-empty list"),
])
def test_invalid_jobs_name_the_entry_and_the_field(tmp_path, document, message):
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(JobsFileError, match=message):
        batch.load_jobs(path)


def test_jobs_file_yaml_and_json_build_the_options_of_clean(tmp_path):
    document = {"defaults": {"data": "fashion-mnist", "per-class": 5, "layers": "fc"},
                "jobs": ["org/model-a@v2", {"source": "./models/b/", "name": "b-strong", "lam": 0.1,
                                            "push_to": "org/b-agme", "per_class": 7}]}
    (tmp_path / "jobs.json").write_text(json.dumps(document))
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump(document))
    jobs = batch.load_jobs(tmp_path / "jobs.yaml")
    assert jobs == batch.load_jobs(tmp_path / "jobs.json")
    assert [job.name for job in jobs] == ["model-a", "b-strong"]
    assert jobs[0].options == batch.CleanOptions(data="fashion-mnist", per_class=5, layers=("fc",))
    assert jobs[1].options == batch.CleanOptions(data="fashion-mnist", per_class=7, layers=("fc",), lam=0.1,
                                                 push_to="org/b-agme")
    (tmp_path / "bad.yaml").write_text("jobs: [a\n")
    with pytest.raises(JobsFileError, match="bad.yaml: not valid YAML"):
        batch.load_jobs(tmp_path / "bad.yaml")


def test_cli_rejects_an_invalid_jobs_file_before_anything_runs(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"data": "fashion-mnist"}, "jobs": ["a", {"source": "b", "gama": 1}]}))
    result = CliRunner().invoke(app, ["batch", str(path), "--out-root", str(tmp_path / "out")])
    assert result.exit_code == JobsFileError.exit_code
    assert "jobs[1] (b): unknown field 'gama' (did you mean 'gamma'?)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sweep_removes_temporary_folders_and_restores_an_interrupted_replace(tmp_path):
    model_dir = tmp_path / "job" / batch.MODEL_DIR
    (tmp_path / "job" / f".{batch.MODEL_DIR}.tmp-abc").mkdir(parents=True)
    old = tmp_path / "job" / f".{batch.MODEL_DIR}.old-123"
    old.mkdir()
    (old / REPORT_NAME).write_text("{}")
    batch._sweep(model_dir)  # killed between the two renames: the previous output comes back
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [batch.MODEL_DIR]
    assert (model_dir / REPORT_NAME).is_file()
