"""Examples that ship with the package, so the main job runs with no download."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sensisearch.errors import SensisearchError

EXAMPLES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Example:
    name: str
    model: Path
    calib_data: Path
    eval_data: Path
    mean: list[float]
    std: list[float]


def available_examples() -> list[str]:
    return sorted(p.parent.name for p in EXAMPLES_DIR.glob("*/example.json"))


def load_example(name: str) -> Example:
    folder = EXAMPLES_DIR / name
    meta_path = folder / "example.json"
    if not meta_path.is_file():
        raise SensisearchError(f"--example {name}: unknown example (available: {', '.join(available_examples()) or 'none'})")
    meta = json.loads(meta_path.read_text())
    return Example(
        name=name,
        model=folder / meta.get("model", next(iter(sorted(folder.glob("*.onnx"))), folder / "model.onnx").name),
        calib_data=folder / meta.get("calib_data", "calib.npz"),
        eval_data=folder / meta.get("eval_data", "eval.npz"),
        mean=[float(v) for v in meta["mean"]],
        std=[float(v) for v in meta["std"]],
    )
