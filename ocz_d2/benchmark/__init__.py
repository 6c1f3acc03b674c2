"""The benchmark harness: the cost of every component of one or more configs, side by side.

For each row (a config file plus ``KEY VALUE`` overrides, as in :mod:`ocz_d2.evaluation.report`)
the model is built (random weights unless the config names a local file) and measured on synthetic
inputs built like the dataset mapper's outputs (:func:`synthetic_inputs`):

- parameters, total and trainable (and the online SSL guide's, which is not a submodule);
- FLOPs of one image's inference forward, in total and per component (:data:`FLOP_COMPONENTS`),
  and of the online guide that finds the object prompts' regions when no object map is given.
  Counted by ``torch.utils.flop_counter`` (fvcore cannot trace this model: its shape checks are
  data-dependent Python) and reported in fvcore's convention, one multiply-add = one FLOP;
- inference latency (one forward of the batch, no gradient) with object maps given and with the
  online guide, and training step time (forward, losses, backward, optimizer step with the
  trainer's optimizer, :func:`~ocz_d2.engine.optimizer.build_optimizer`): median and quartiles
  over ``repeats`` runs after ``warmup`` runs;
- time per component inside the training step (:data:`TIMED_COMPONENTS`: matchers, pseudo-mask
  clustering, criterion), by timing wrappers on the found modules' entry methods;
- peak memory with the row's model alone in the process: CPU RSS (reset per row where Linux
  allows it) and the CUDA allocator's peak, over the build and one run of each kind;
- the train data loader's images/s and images/s per loader worker (when the dataset's files
  exist, or on stand-in files in its formats, :mod:`ocz_d2.benchmark.stand_in`) and the evaluator's
  ``process`` throughput in pixels/s on random predictions;
- every headline number divided by the first row's (:func:`add_ratios`).

Times are taken interleaved: all rows' models are alive and each round runs every row once, so
that a change in the machine's load (other jobs) falls on all rows alike and the ratios hold.

Components are found by module path or class name, so a config without one (or a model from
before it existed) reports it as absent (``None``), never as an error.

Modules: :mod:`~ocz_d2.benchmark.measure` (settings, components, timing, FLOPs, memory),
:mod:`~ocz_d2.benchmark.inputs` (synthetic model inputs), :mod:`~ocz_d2.benchmark.stand_in`
(stand-in dataset files), :mod:`~ocz_d2.benchmark.throughput` (train loader and evaluator),
:mod:`~ocz_d2.benchmark.harness` (the rows and the run), :mod:`~ocz_d2.benchmark.tables`
(Markdown). ``tools/benchmark.py`` is the command line.
"""

from .harness import (
    SUMMARY_KEYS,
    RowSession,
    add_ratios,
    load_row_config,
    profile_row,
    run_benchmark,
)
from .inputs import synthetic_inputs
from .measure import (
    FLOP_COMPONENTS,
    TIMED_COMPONENTS,
    BenchmarkSettings,
    Component,
    count_flops,
    time_components,
    timing_stats,
)
from .tables import format_markdown, loader_cell
from .throughput import evaluator_throughput, loader_throughput

__all__ = [
    "FLOP_COMPONENTS",
    "SUMMARY_KEYS",
    "TIMED_COMPONENTS",
    "BenchmarkSettings",
    "Component",
    "RowSession",
    "add_ratios",
    "count_flops",
    "evaluator_throughput",
    "format_markdown",
    "load_row_config",
    "loader_cell",
    "loader_throughput",
    "profile_row",
    "run_benchmark",
    "synthetic_inputs",
    "time_components",
    "timing_stats",
]
