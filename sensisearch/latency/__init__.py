"""Latency without timing the target: an explicit, labelled estimate (issue 10).

A measured per-layer latency table (``sensisearch latency-table``) is not
implemented yet; until then, :func:`estimated_cost` is the documented
stand-in, and everything that shows it says "estimated".
"""

from sensisearch.latency._estimate import PRECISION_COST, ESTIMATE_LABEL, estimated_cost, layer_macs

__all__ = ["ESTIMATE_LABEL", "PRECISION_COST", "estimated_cost", "layer_macs"]
