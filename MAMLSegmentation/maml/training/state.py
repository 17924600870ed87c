"""``training_state.pt``: everything needed to continue a run exactly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import MAMLError
from ..io import atomic_path


STATE_FORMAT = "maml-training-state"
STATE_VERSION = 1
STATE_FILE = "training_state.pt"


def save_state(path: Path, payload: dict) -> None:
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise MAMLError(f"training state {path} cannot be read: {error}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise MAMLError(f"{path} is not a maml training state")
    if state.get("version", 0) > STATE_VERSION:
        raise MAMLError(f"training state {path} is from a newer maml; update it to resume")
    return state


def numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def json_ready(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
