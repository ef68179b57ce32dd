"""Weights on the wire: a state dict as numpy arrays, the form a weight update takes through the object store."""

from __future__ import annotations

import numpy as np
import torch


def to_wire(state_dict: dict[str, torch.Tensor], dtype: str = "float32") -> dict:
    """A state dict as numpy arrays in `dtype`: numpy travels through the object store without a copy,
    torch tensors would be pickled. bfloat16, which numpy lacks, travels as its 16-bit patterns."""
    tensors = {}
    for name, t in state_dict.items():
        t = t.detach().to("cpu", getattr(torch, dtype)).contiguous()
        tensors[name] = (t.view(torch.int16) if dtype == "bfloat16" else t).numpy()
    return {"dtype": dtype, "tensors": tensors}


def from_wire(weights: dict) -> dict[str, torch.Tensor]:
    """The tensors of a `to_wire` payload. np.array copies: the object store hands out read-only views."""
    bf16 = weights["dtype"] == "bfloat16"
    out = {}
    for name, array in weights["tensors"].items():
        t = torch.from_numpy(np.array(array))
        out[name] = t.view(torch.bfloat16) if bf16 else t
    return out
