"""Research tooling, not needed to clean a model: backdoor training, baseline defences, the benchmark, the demo.

Modules: :mod:`.backdoor` (train backdoored models on real offline data), :mod:`.baselines` (FT, FP, CLP,
NC, FT-SAM), :mod:`.bench` (the grid, tables and plots), :mod:`.demo` (``agme demo``).
"""

from .backdoor import BackdoorConfig as BackdoorConfig
from .backdoor import train_backdoored as train_backdoored
from .demo import run_demo as run_demo

__all__ = ["BackdoorConfig", "train_backdoored", "run_demo"]
