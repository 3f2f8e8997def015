"""The search space: Optuna parameters <-> :class:`TrialConfig`.

Parameter names are stable strings stored in the study, so a resumed or shared
study (many workers, one storage) decodes every trial the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import optuna

from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.study.store._record import TrialRecord

LAYER_PREFIX = "layer:"
GROUP_PREFIX = "group:"
"""``group:<first layer of the group>`` (``--search groups``): one precision for a fusion group."""
ALGORITHM = "calib_algorithm"
SAMPLES = "calib_samples"
PERCENTILE = "calib_percentile"
BIAS = "calib_bias_correction"


@dataclass(frozen=True)
class SearchSpace:
    layers: tuple[str, ...]
    precisions: tuple[Precision, ...]
    algorithms: tuple[CalibrationAlgorithm, ...]
    sample_counts: tuple[int, ...]
    percentiles: tuple[float, ...]
    default_calibration: CalibrationChoice
    # A compact space (``--search topk``): only these layers are
    # parameters, every other layer is ``fixed_precision``. None: every layer is free.
    free_layers: tuple[str, ...] | None = None
    fixed_precision: Precision = Precision.INT8
    # ``--search groups``: one parameter per precision group (layers the
    # backend fuses across a residual Add or Concat, see quantize/_groups.py); every
    # layer of a group takes the group's precision. None: one parameter per layer.
    groups: tuple[tuple[str, ...], ...] | None = None
    bias_correction: tuple[bool, ...] = (False,)
    """Bias correction choices of an INT8 trial: (False,) off, (False, True) searched (the guided study)."""

    @property
    def searched_layers(self) -> tuple[str, ...]:
        """The layers that are Optuna parameters."""
        return self.layers if self.free_layers is None else tuple(n for n in self.layers if n in set(self.free_layers))

    def expresses(self, config: TrialConfig) -> bool:
        """Whether :meth:`suggest` can produce ``config`` (fixed layers at the fixed precision; each group uniform)."""
        if self.groups is not None:
            return all(len({config.precisions[n] for n in group}) == 1 for group in self.groups)
        free = set(self.searched_layers)
        return all(config.precisions[n] is self.fixed_precision for n in self.layers if n not in free)

    @property
    def searches_int8(self) -> bool:
        return Precision.INT8 in self.precisions

    def suggest(self, trial: optuna.Trial) -> TrialConfig:
        choices = [p.value for p in self.precisions]
        if self.groups is not None:
            precisions = {
                name: precision
                for group in self.groups
                for precision in (Precision(trial.suggest_categorical(GROUP_PREFIX + group[0], choices)),)
                for name in group
            }
            precisions = {name: precisions[name] for name in self.layers}
            searched = self.layers
        else:
            searched = self.searched_layers
            precisions = {name: Precision(trial.suggest_categorical(LAYER_PREFIX + name, choices)) for name in searched}
        if len(searched) < len(self.layers):
            # A baseline (all-FP32, ...) is uniform in any space: its mark, not its
            # parameters, says so for the layers the compact space holds fixed.
            uniform = TrialRecord.from_attrs(trial.number, trial.user_attrs).baseline
            rest = Precision(uniform) if uniform else self.fixed_precision
            precisions = {name: precisions.get(name, rest) for name in self.layers}
        calibration = self.default_calibration
        if any(p is Precision.INT8 for p in precisions.values()):
            # Calibration only matters when some layer is INT8; leaving the
            # parameters out otherwise keeps the sampler's model honest.
            algorithm = CalibrationAlgorithm(trial.suggest_categorical(ALGORITHM, [a.value for a in self.algorithms]))
            samples = int(trial.suggest_categorical(SAMPLES, list(self.sample_counts)))
            percentile = self.default_calibration.percentile
            if algorithm.reads_percentile:
                percentile = float(trial.suggest_categorical(PERCENTILE, list(self.percentiles)))
            bias = self.bias_correction[0]
            if len(self.bias_correction) > 1:
                bias = bool(trial.suggest_categorical(BIAS, list(self.bias_correction)))
            calibration = CalibrationChoice(algorithm, samples, percentile, bias)
        return TrialConfig(precisions, calibration)

    def params_for(self, config: TrialConfig) -> dict[str, Any]:
        """Optuna parameters that reproduce ``config`` (for enqueueing)."""
        if self.groups is not None:
            if not self.expresses(config):
                raise ValueError("configuration mixes precisions inside a fusion group; the groups space cannot express it")
            params: dict[str, Any] = {GROUP_PREFIX + g[0]: config.precisions[g[0]].value for g in self.groups}
        else:
            params = {LAYER_PREFIX + name: config.precisions[name].value for name in self.searched_layers}
        if config.uses_int8:
            params[ALGORITHM] = config.calibration.algorithm.value
            params[SAMPLES] = config.calibration.samples
            if config.calibration.algorithm.reads_percentile:
                params[PERCENTILE] = config.calibration.percentile
            if len(self.bias_correction) > 1:
                params[BIAS] = config.calibration.bias_correction
        return params

    def uniform(self, precision: Precision) -> TrialConfig:
        return TrialConfig.uniform(list(self.layers), precision, self.default_calibration)


def capped_sample_counts(requested: Sequence[int], available: int) -> tuple[int, ...]:
    """The study's calibration sample counts, capped by the data size."""
    return tuple(sorted({min(int(c), available) for c in requested}))
