"""Measurements you can ship on: paired speed-ups and accuracy drops with their uncertainty.

- :func:`time_interleaved` times any number of arms against a reference in
  shuffled, interleaved rounds and returns a :class:`PairedLatency` per arm
  (median per-round speed-up, its bootstrap CI, spread, machine load).
- :func:`bootstrap_ci` and :func:`paired_bootstrap_drop` give percentile
  bootstrap intervals (:class:`PairedBootstrap`: many candidates against one reference); :func:`within_noise` labels a difference whose CI holds 0.
- :class:`DetectionMatches` keeps pycocotools' per-image matching and
  re-accumulates COCO mAP exactly, with per-image bootstrap weights.
- :class:`MachineLoad` / :func:`machine_identity` say what the machine was doing
  and what it is.
- :func:`wait_for_quiet` / :func:`pinned` / :class:`LoadPolicy` (``time_interleaved(..., load=)``)
  time only on free cores, pinned, re-timing blocks taken under load (:class:`LoadRecord`).
- :func:`aa_control` / :func:`time_with_control` / :func:`control_ok` / :func:`corrected`: the
  FP32-vs-FP32 control that says whether reference and candidates are timed alike.
- :func:`spearman_rho` ranks two paired samples alike or not (stage 2, sensitivity stability).
"""

from sensisearch.measure._bootstrap import (
    DropEstimate,
    PairedBootstrap,
    accuracy_points,
    bootstrap_ci,
    paired_bootstrap_drop,
    resample_weights,
    within_noise,
)
from sensisearch.measure._control import (
    CONTROL_ARM,
    ControlResult,
    aa_control,
    control_ok,
    control_result,
    corrected,
    corrected_speedup,
    time_with_control,
)
from sensisearch.measure._detection import (
    IOU_THRESHOLDS,
    RECALL_THRESHOLDS,
    DetectionMatches,
    map50_95_points,
    map50_points,
)
from sensisearch.measure._load import (
    LoadPolicy,
    LoadRecord,
    LoadSample,
    QuietVerdict,
    least_busy_cores,
    parse_loadavg,
    parse_proc_stat,
    pinned,
    sample_load,
    thread_affinities,
    wait_for_quiet,
)
from sensisearch.measure._machine import (
    LoadMonitor,
    MachineIdentity,
    MachineLoad,
    machine_identity,
)
from sensisearch.measure._noise import noise_summary
from sensisearch.measure._rank import average_ranks, spearman_rho
from sensisearch.measure._timing import (
    PairedLatency,
    PairedTimingSettings,
    paired_ratios,
    time_interleaved,
)

__all__ = [
    "CONTROL_ARM",
    "ControlResult",
    "DetectionMatches",
    "IOU_THRESHOLDS",
    "RECALL_THRESHOLDS",
    "DropEstimate",
    "LoadMonitor",
    "LoadPolicy",
    "LoadRecord",
    "LoadSample",
    "MachineIdentity",
    "MachineLoad",
    "PairedBootstrap",
    "PairedLatency",
    "PairedTimingSettings",
    "QuietVerdict",
    "aa_control",
    "accuracy_points",
    "average_ranks",
    "bootstrap_ci",
    "control_ok",
    "control_result",
    "corrected",
    "corrected_speedup",
    "least_busy_cores",
    "machine_identity",
    "map50_95_points",
    "map50_points",
    "noise_summary",
    "paired_bootstrap_drop",
    "paired_ratios",
    "parse_loadavg",
    "parse_proc_stat",
    "pinned",
    "resample_weights",
    "sample_load",
    "spearman_rho",
    "thread_affinities",
    "time_interleaved",
    "time_with_control",
    "wait_for_quiet",
    "within_noise",
]
