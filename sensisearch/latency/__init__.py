"""Latency without timing the target.

:class:`LatencyPredictor` is what the study asks of a latency it cannot time:
a measured per-layer table (``sensisearch latency-table``), or the documented
:class:`MacEstimate`, which is labelled "estimated" wherever it appears.
"""

from sensisearch.latency._measure import measure_table
from sensisearch.latency._estimate import ESTIMATE_LABEL, PRECISION_COST, estimated_cost, layer_macs
from sensisearch.latency._predictor import (
    SOURCE_ESTIMATE,
    SOURCE_PAIRED,
    SOURCE_TABLE,
    LatencyPredictor,
    MacEstimate,
)
from sensisearch.latency._table import (
    TABLE_FORMAT,
    TABLE_VERSION,
    ConfigProfile,
    LatencyTable,
    boundary_count,
    boundary_tensors,
    fit_table,
    load_latency_table,
)

__all__ = [
    "measure_table",
    "ESTIMATE_LABEL",
    "PRECISION_COST",
    "SOURCE_ESTIMATE",
    "SOURCE_PAIRED",
    "SOURCE_TABLE",
    "TABLE_FORMAT",
    "TABLE_VERSION",
    "ConfigProfile",
    "LatencyPredictor",
    "LatencyTable",
    "MacEstimate",
    "boundary_count",
    "boundary_tensors",
    "estimated_cost",
    "fit_table",
    "layer_macs",
    "load_latency_table",
]
