"""The benchmark grid: AGME against the baseline defences, side by side, on real offline data.

``run_bench(BenchConfig.quick(), "bench-out")`` trains (or reuses from the cache) one backdoored timm
model per (dataset, architecture, trigger, seed), then for every clean-image budget runs every defence
on the same images and the same model, and writes ``runs.csv``, ``runs.json``, ``table.md`` and PNG
plots. What is measured, and how:

- The evaluation images are fixed per dataset: ``eval_per_class`` images per class of the test split,
  drawn once with a fixed seed. The clean images a defence may use (its budget, ``per_class`` per class)
  come from the rest of the test split with :func:`agme_hub.data.split_edit_eval` (seeded by the run's
  seed; budgets are nested: the 5 images of a class include the 1). Train and test splits never mix.
- CA, ASR, TA, RA on the evaluation images with the real trigger (also for AGME without backdoor
  knowledge, whose edit used a surrogate); DER as in FT-SAM, against the backdoored model.
- Hyperparameters: never chosen on test data. AGME chooses its layers and lam by cross-validation on
  its own budget; the baselines use their published defaults (and FP its accuracy-drop rule on the
  budget). Every value is recorded with where it came from.
- Knowledge: ``agme-bdk`` gets the true trigger and target; ``agme-nobdk`` and ``nc`` get the target but
  not the trigger (both reconstruct one); ``ft``, ``fp``, ``clp`` and ``ftsam`` get neither.
- Wall seconds of the defence alone: ``time.perf_counter`` around the one call that defends (it
  includes the copy of the model each defence works on; evaluation is outside).
- Peak memory: the memory the defence added at its peak, torch tensors included (``tracemalloc`` would
  miss them), measured in this process after ``gc.collect`` and ``malloc_trim``: the larger of the
  resident-set high-water mark (``VmHWM``, reset with ``/proc/self/clear_refs`` just before) minus the
  resident set at that moment, and the anonymous resident memory (``RssAnon``) sampled every 2 ms minus
  its value at that moment (see :class:`PeakMemory`; the method is recorded in each row).
- The forward-pass floor: seconds of plain forward passes (no hooks, no gradients) over D and T(D) with
  all the augmented copies the engine uses, i.e. the images the edit reads. AGME's edit (its final
  capture + solve) and its whole run are reported against it, and each defence's time against AGME's.

The package, one concern a module: :mod:`.grid` (archs, triggers, defences, :class:`BenchConfig`),
:mod:`.measure` (:class:`PeakMemory`, :func:`forward_floor`), :mod:`.models` (the backdoored models, trained once
and cached), :mod:`.cells` (one cell, and the resumable run over every cell), :mod:`.tables` (aggregation and the
headline), :mod:`.markdown` (the text of table.md), :mod:`.plots` and :mod:`.outputs` (the files of a run),
:mod:`.ablation` (the paper's Figure 4: lam and gamma swept on one model, ``agme bench --ablation``).
"""

from __future__ import annotations

from .ablation import AblationConfig, run_ablation
from .cells import run_bench
from .grid import AGME_DEFENCES, ARCHS, DEFENCES, TRIGGERS, ArchSpec, BenchConfig, arch_spec, config_with
from .measure import PeakMemory, forward_floor
from .models import backdoored_model, resolve_trigger
from .outputs import CSV_COLUMNS, report_partial, write_outputs
from .plots import plot
from .tables import CELL, METRICS, aggregate, best_per_cell, headline, headline_markdown, headline_rows

__all__ = [
    "ArchSpec", "ARCHS", "TRIGGERS", "DEFENCES", "BenchConfig", "run_bench", "write_outputs", "aggregate",
    "best_per_cell", "headline", "PeakMemory", "forward_floor", "report_partial", "headline_rows", "headline_markdown",
    "config_with", "AGME_DEFENCES", "AblationConfig", "run_ablation", "arch_spec",
    "resolve_trigger", "backdoored_model", "CSV_COLUMNS", "CELL", "METRICS", "plot",
]
