"""Memory: the bytes a forward pass saves for its backward (measured, on any device), and the
analytic size of what vanilla and deformable attention keep per query."""
from __future__ import annotations
from __future__ import annotations
from typing import Callable, Dict, Tuple
import torch


def attention_memory(n_q: int, n_k: int, n_heads: int, bytes_per_element: int = 4) -> int:
    """Bytes of the attention matrices A (M x N_q x N_k), the quadratic part of the memory."""
    return n_heads * n_q * n_k * bytes_per_element


def deformable_attention_memory(n_q: int, n_heads: int = 8, n_levels: int = 1, n_points: int = 4,
                                bytes_per_element: int = 4) -> int:
    """Bytes of the sampling locations (2 numbers) and weights (1) per query: linear in N_q."""
    return 3 * n_q * n_heads * n_levels * n_points * bytes_per_element


def saved_tensor_bytes(fn: Callable, *args) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass while ``fn(*args)`` runs.

    This is the activation memory training must keep per layer. Tensors that share storage are
    counted once. Run it with grad enabled and at least one input (or parameter) requiring grad.
    """
    storages: Dict[Tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[(str(t.device), s.data_ptr())] = s.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return int(sum(storages.values()))
