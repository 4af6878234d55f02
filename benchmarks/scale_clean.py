"""How the cost of ``agme_hub.clean`` grows with model size, classes and image count, against the floor.

Times ``agme_hub.clean`` end to end (trigger known, layers and lam chosen by cross-validation, the
engine's default augmented copies; no held-out evaluation) on timm models with random weights at 224 px,
with 10 or 1000 classes and 1 to 10 images per class, next to the forward-pass floor: plain forward passes
over the same images the edit reads (D and T(D), with every augmented copy). Each stage of the engine's
``Timings`` is reported, with peak memory and the ratios edit / floor and total / floor. Random weights
carry no backdoor, so only the times mean anything here; the benchmark grid (``agme bench``) measures removal.

Images are Fashion-MNIST test images (grey, repeated to RGB); with more classes than 10 they are relabelled
round-robin (the labels only shape the folds and the target-class statistics).

    python benchmarks/scale_clean.py --archs resnet50 --per-class 1 --per-class 10 --threads 2
    python benchmarks/scale_clean.py --archs resnet50 --archs convnext_tiny --archs vit_base_patch16_224 \\
        --archs efficientnet_b0 --classes 10 --classes 1000 --per-class 1 --per-class 5 --per-class 10

Prints one line per run and writes ``scale.json`` and ``scale.md`` into ``--out`` (after every run), with
the machine: platform, cores, torch threads and the load average when the sweep started.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

app = typer.Typer(add_completion=False)

ARCHS = ["resnet50", "convnext_tiny", "vit_base_patch16_224", "efficientnet_b0"]


def _model(arch: str, size: int, classes: int) -> torch.nn.Module:
    from agme_hub.lab.backdoor import create_classifier

    # ImageNet statistics, as a pretrained checkpoint would have; 1-channel images are repeated to RGB.
    return create_classifier(arch, num_classes=classes, in_chans=3, img_size=size, mean=(0.485, 0.456, 0.406),
                             std=(0.229, 0.224, 0.225)).eval()


def _edit_images(test, classes: int, per_class: int):  # type: ignore[no-untyped-def]
    from agme_hub.data import ImageSet, split_edit_eval

    if classes == test.num_classes:
        return split_edit_eval(test, per_class, seed=0)[0]
    count = classes * per_class
    if count > len(test):
        raise typer.BadParameter(f"{classes} classes x {per_class} needs {count} images; the test split has {len(test)}")
    pick = np.random.default_rng(0).permutation(len(test))[:count]
    return ImageSet(test.images[pick], np.arange(count) % classes, [f"class {i}" for i in range(classes)],
                    f"{test.name} relabelled to {classes} classes")


def _machine(threads: int) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in load] if load else None}


@app.command()
def main(
    archs: Annotated[list[str], typer.Option("--archs", help="timm architectures (repeat).")] = ARCHS,
    classes: Annotated[list[int], typer.Option("--classes", help="Classes of the head (repeat).")] = [10],
    per_class: Annotated[list[int], typer.Option("--per-class", help="Images per class (repeat).")] = [1, 5, 10],
    size: Annotated[int, typer.Option("--size", help="Input side in pixels.")] = 224,
    threads: Annotated[int, typer.Option("--threads", help="torch threads.")] = 1,
    trigger: Annotated[str, typer.Option("--trigger")] = "badnets-white-br",
    copies: Annotated[int | None, typer.Option("--copies", help="Augmented copies of each edit image "
                                                     "(default: the engine's).")] = None,
    unknown_trigger: Annotated[bool, typer.Option("--unknown-trigger", help="Clean without the trigger (target "
                                                  "given): surrogates are inverted; the floor stays D and T(D).")] = False,
    append: Annotated[bool, typer.Option("--append", help="Keep the runs already in --out/scale.json.")] = False,
    out: Annotated[Path, typer.Option("--out")] = Path("benchmarks/results/scale"),
    reference: Annotated[bool, typer.Option("--reference", help="Also time clean(replay=False): the whole network "
                                                              "for every fold and setting, as before the replay.")] = False,
) -> None:
    import agme_hub
    from agme_hub.data import load_images
    from agme_hub.constants import DEFAULT_AUGMENT_COPIES
    from agme_hub.lab.bench import PeakMemory, forward_floor

    torch.set_num_threads(threads)
    machine = _machine(threads)
    test = load_images("fashion-mnist", split="test")
    parsed = agme_hub.parse_trigger(trigger)
    runs = _previous_runs(out) if append else []
    engine_copies = {} if copies is None else {"augment_copies": copies}
    for arch in archs:
        for n_classes in classes:
            torch.manual_seed(0)
            model = _model(arch, size, n_classes)
            params = sum(p.numel() for p in model.parameters())
            for n in per_class:
                data = _edit_images(test, n_classes, n)
                floor, images = forward_floor(model, data, parsed, copies=copies, seed=0)
                with PeakMemory() as mem:
                    start = time.perf_counter()
                    result = agme_hub.clean(model, data, trigger=None if unknown_trigger else trigger, target=0,
                                            seed=0, **engine_copies)
                    total = time.perf_counter() - start
                t = result.timings
                edit = t.capture + t.solve
                cv = (t.selection or 0.0) - (t.selection_capture or 0.0)
                run = {"arch": arch, "params_m": round(params / 1e6, 2), "size": size, "classes": n_classes,
                       "per_class": n, "trigger": "unknown (target given)" if unknown_trigger else trigger,
                       "copies": copies if copies is not None else DEFAULT_AUGMENT_COPIES,
                       "threads": threads, "load_average_at_start": _load(), "images": len(data), "floor_images": images, "floor_s": round(floor, 2),
                       "per_image_ms": round(1000 * floor / images, 1),
                       "stages_s": {"selection_capture": round(t.selection_capture or 0.0, 2),
                                    "selection_trials": round(cv, 2), "capture": round(t.capture, 2),
                                    "solve": round(t.solve, 3), "bn_stats": round(t.bn_stats, 2),
                                    "inversion": round(t.inversion or 0.0, 2)},
                       "edit_s": round(edit, 2), "selection_s": round(t.selection or 0.0, 2), "total_s": round(total, 2),
                       "edit_over_floor": round(edit / floor, 2), "total_over_floor": round(total / floor, 2),
                       "capture_over_floor": round(t.total_capture / floor, 2),
                       "peak_mb": None if mem.peak_mb is None else round(mem.peak_mb), "layers": result.layers,
                       "lam": result.lam}
                if reference:
                    start = time.perf_counter()
                    slow = agme_hub.clean(model, data, trigger=None if unknown_trigger else trigger, target=0,
                                          seed=0, replay=False, **engine_copies)
                    slow_total = time.perf_counter() - start
                    run.update(reference_total_s=round(slow_total, 2),
                               reference_total_over_floor=round(slow_total / floor, 2),
                               reference_same_edit=slow.layers == result.layers and slow.lam == result.lam)
                runs.append(run)
                print(json.dumps(run), flush=True)
                _write(out, runs, machine)  # after every run: a stopped sweep keeps what it measured


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _previous_runs(out: Path) -> list[dict]:
    path = out / "scale.json"
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def _write(out: Path, runs: list[dict], machine: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"environment": machine, "runs": runs}, indent=1) + "\n")
    header = ["arch", "params (M)", "px", "classes", "img/class", "trigger", "copies", "threads", "load at start",
              "floor images", "floor s", "ms/image", "inversion s", "CV capture s", "CV trials s", "final capture s",
              "solve s", "total s", "edit/floor", "total/floor", "peak MiB", "reference total/floor", "layers", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        s = r["stages_s"]
        lines.append("| " + " | ".join(str(v) for v in (
            r["arch"], r["params_m"], r["size"], r["classes"], r["per_class"], r.get("trigger", ""),
            r.get("copies", ""), r.get("threads", ""), r.get("load_average_at_start", ""), r["floor_images"],
            r["floor_s"], r["per_image_ms"], s.get("inversion", ""), s["selection_capture"], s["selection_trials"],
            s["capture"], s["solve"], r["total_s"], r["edit_over_floor"], r["total_over_floor"], r["peak_mb"],
            r.get("reference_total_over_floor", ""), ", ".join(r["layers"]), r.get("note", ""))) + " |")
    intro = (f"Machine: {json.dumps(machine)}\n\nThe load average (1, 5, 15 min) is recorded when the sweep "
             f"started and before each run ({machine['cpu_count']} cores): a load above the core count means other "
             "jobs shared the machine and the seconds are inflated; the ratios to the forward-pass floor, measured in "
             "the same run, are what to read.\n\n"
             "Command: `python benchmarks/scale_clean.py` with the arguments in `scale.json`'s runs. "
             "`floor`: plain forward passes over the images the edit reads (D and T(D), every augmented copy). "
             "`reference total/floor` (with `--reference`): the same clean with `replay=False`, the whole network "
             "for every fold and setting (the engine before the replay).\n\n")
    (out / "scale.md").write_text(intro + "\n".join(lines) + "\n")


if __name__ == "__main__":
    app()
