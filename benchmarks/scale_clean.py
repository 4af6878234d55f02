"""How the cost of ``agme_hub.clean`` grows with model size and image count.

Times ``agme_hub.clean`` end to end (trigger known, layers and lam chosen by cross-validation, the
engine's default augmented copies) on timm models with random weights at 224 px, for 1, 5 and 10
Fashion-MNIST images per class, next to the forward-pass floor: plain forward passes over the same
images the edit reads (D and T(D), with every augmented copy). Random weights carry no backdoor, so
only the times mean anything here; the benchmark grid (``agme bench``) measures removal.

    python benchmarks/scale_clean.py                                  # resnet18 + resnet50, 1/5/10 per class
    python benchmarks/scale_clean.py --archs resnet50 --per-class 1 --per-class 5 --threads 2

Prints one line per run and writes ``scale.json`` and ``scale.md`` into ``--out``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

app = typer.Typer(add_completion=False)


def _model(arch: str, size: int) -> torch.nn.Module:
    from agme_hub.lab.backdoor import create_classifier

    # ImageNet statistics, as a pretrained checkpoint would have; 1-channel images are repeated to RGB.
    return create_classifier(arch, num_classes=10, in_chans=3, img_size=size, mean=(0.485, 0.456, 0.406),
                             std=(0.229, 0.224, 0.225)).eval()


@app.command()
def main(
    archs: Annotated[list[str], typer.Option("--archs", help="timm architectures (repeat).")] = ["resnet18", "resnet50"],
    per_class: Annotated[list[int], typer.Option("--per-class", help="Images per class (repeat).")] = [1, 5, 10],
    size: Annotated[int, typer.Option("--size", help="Input side in pixels.")] = 224,
    threads: Annotated[int, typer.Option("--threads", help="torch threads.")] = 1,
    trigger: Annotated[str, typer.Option("--trigger")] = "badnets-white-br",
    out: Annotated[Path, typer.Option("--out")] = Path("benchmarks/results/scale"),
) -> None:
    import agme_hub
    from agme_hub.lab.bench import PeakMemory, forward_floor
    from agme_hub.data import load_images, split_edit_eval

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    test = load_images("fashion-mnist", split="test")
    parsed = agme_hub.parse_trigger(trigger)
    runs = []
    for arch in archs:
        model = _model(arch, size)
        params = sum(p.numel() for p in model.parameters())
        for n in per_class:
            data, _ = split_edit_eval(test, n, seed=0)
            floor, images = forward_floor(model, data, parsed, seed=0)
            with PeakMemory() as mem:
                start = time.perf_counter()
                result = agme_hub.clean(model, data, trigger=trigger, target=0, seed=0)
                total = time.perf_counter() - start
            t = result.timings
            edit = t.capture + t.solve
            run = {"arch": arch, "params_m": round(params / 1e6, 2), "size": size, "per_class": n, "images": len(data),
                   "floor_images": images, "floor_s": round(floor, 2), "per_image_ms": round(1000 * floor / images, 1),
                   "edit_s": round(edit, 2), "solve_s": round(t.solve, 3),
                   "selection_s": round(t.selection or 0.0, 2), "total_s": round(total, 2),
                   "edit_over_floor": round(edit / floor, 2), "total_over_floor": round(total / floor, 2),
                   "peak_mb": None if mem.peak_mb is None else round(mem.peak_mb), "layers": result.layers,
                   "lam": result.lam}
            runs.append(run)
            print(json.dumps(run), flush=True)
            _write(out, runs, threads)  # after every run: a stopped sweep keeps what it measured


def _write(out: Path, runs: list[dict], threads: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
           "platform": platform.platform(), "cpu_count": __import__("os").cpu_count()}
    (out / "scale.json").write_text(json.dumps({"environment": env, "runs": runs}, indent=1) + "\n")
    header = ["arch", "params (M)", "px", "img/class", "floor images", "floor s", "ms/image", "edit s", "solve s",
              "selection s", "total s", "edit/floor", "total/floor", "peak MiB", "layers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        lines.append("| " + " | ".join(str(v) for v in (r["arch"], r["params_m"], r["size"], r["per_class"],
                     r["floor_images"], r["floor_s"], r["per_image_ms"], r["edit_s"], r["solve_s"], r["selection_s"],
                     r["total_s"], r["edit_over_floor"], r["total_over_floor"], r["peak_mb"],
                     ", ".join(r["layers"]))) + " |")
    (out / "scale.md").write_text(f"Environment: {json.dumps(env)}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    app()
