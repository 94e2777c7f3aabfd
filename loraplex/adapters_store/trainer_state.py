"""A checkpoint's training metrics from the `trainer_state.json` the Hugging Face Trainer saves beside it:
the last logged training loss and the global step, for metrics-weighted averaging (MWA)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import invalid

TRAINER_STATE = "trainer_state.json"
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class TrainerMetrics:
    loss: float | None  # the last logged training loss
    step: int | None  # global_step


def read_trainer_metrics(directory: Path) -> TrainerMetrics | None:
    """None when the directory holds no trainer_state.json; a clear error when it holds a bad one."""
    file = Path(directory) / TRAINER_STATE
    if not file.exists():
        return None
    if file.stat().st_size > MAX_BYTES:
        raise invalid(TRAINER_STATE, f"is over {MAX_BYTES >> 20} MiB; a trainer state is a small JSON file")
    try:
        state = json.loads(file.read_text())
    except (ValueError, RecursionError) as e:
        raise invalid(TRAINER_STATE, f"is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(state, dict):
        raise invalid(TRAINER_STATE, "must hold a JSON object")
    history = state.get("log_history")
    losses = [entry["loss"] for entry in history if isinstance(entry, dict) and _positive(entry.get("loss"))] \
        if isinstance(history, list) else []
    step = state.get("global_step")
    return TrainerMetrics(loss=float(losses[-1]) if losses else None,
                          step=step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else None)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
