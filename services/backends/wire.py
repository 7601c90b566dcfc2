"""State dicts on the wire between Ray actors: numpy arrays, which Ray ships zero-copy.

Ray pickles a torch tensor by copying its bytes; a numpy array travels as an out-of-band buffer
in the object store and is read back as a view of it. For the tiny model's weight sync (50
tensors, 4 MB) that took the learner's return from ~20 to ~4 ms and the rollout actor's fetch
from ~10 to under 1 ms (scripts/bench_components.py prints both ways).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# torch dtypes numpy holds bit-for-bit (bfloat16 has no numpy twin: such tensors travel as they are)
_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                 torch.uint8, torch.bool}


def to_wire(state: dict[str, torch.Tensor] | None) -> dict | None:
    """CPU tensors as numpy arrays (views, no copy); anything else unchanged."""
    if state is None:
        return None
    return {
        k: v.detach().contiguous().numpy() if isinstance(v, torch.Tensor) and v.device.type == "cpu"
        and v.dtype in _NUMPY_DTYPES else v
        for k, v in state.items()
    }


def from_wire(state: dict) -> dict[str, torch.Tensor]:
    """Tensors again: numpy arrays become tensors sharing their memory (read-only when they are views
    of Ray's object store: load them into a model, do not write to them)."""
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, v in state.items():
            out[k] = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
    return out
