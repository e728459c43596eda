"""Exact maximum-inner-product search over memory-bank embeddings."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor

__all__ = ["INDEX_BACKENDS", "search_inner_product"]

#: Backends accepted by ``index=``: FAISS's exact flat inner-product search (the search that
#: ``faiss.IndexFlatIP`` runs), exact chunked torch matmul + topk, and ``"auto"``, which picks
#: ``"flat"`` for CPU tensors and ``"torch"`` otherwise.
INDEX_BACKENDS = ("auto", "flat", "torch")

# Rows of the (queries x database) score matrix computed at once by the torch backend; bounds
# its temporary memory to _TORCH_QUERY_CHUNK * M floats.
_TORCH_QUERY_CHUNK = 256


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in INDEX_BACKENDS:
        raise ValueError(f"index must be one of {INDEX_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flat" if device.type == "cpu" else "torch"
    if backend == "flat" and device.type != "cpu":
        raise ValueError(
            f"index='flat' runs FAISS on the CPU but the bank is on {device}; use index='torch' "
            "or index='auto' for accelerator tensors"
        )
    return backend


def _as_float32_numpy(tensor: Tensor) -> np.ndarray:
    # FAISS takes C-contiguous float32; a contiguous float32 CPU tensor is shared without a copy.
    return np.ascontiguousarray(tensor.detach().to(torch.float32).numpy())


def search_inner_product(
    queries: Tensor, database: Tensor, k: int, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Return the ``k`` database rows with the largest inner product for each query.

    Args:
        queries: ``(Q, D)``.
        database: ``(M, D)`` on the same device.
        k: candidates per query, ``1 <= k <= M``.
        backend: ``"flat"`` (FAISS, CPU), ``"torch"`` or ``"auto"``.

    Returns:
        ``(scores, rows)``: float32 ``(Q, k)`` inner products in descending order and int64
        ``(Q, k)`` database row indices, on the queries' device.
    """
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries (Q, D) and database (M, D) must share D, got {tuple(queries.shape)} "
            f"and {tuple(database.shape)}"
        )
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f"k must be in [1, {database.shape[0]}] for this database, got {k}")
    backend = _resolve_backend(backend, database.device)

    if backend == "flat":
        scores, rows = faiss.knn(
            _as_float32_numpy(queries),
            _as_float32_numpy(database),
            k,
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        return torch.from_numpy(scores), torch.from_numpy(rows).to(torch.int64)

    score_chunks, row_chunks = [], []
    database = database.to(torch.float32)
    for start in range(0, queries.shape[0], _TORCH_QUERY_CHUNK):
        block = queries[start : start + _TORCH_QUERY_CHUNK].to(torch.float32) @ database.T
        scores, rows = torch.topk(block, k, dim=1)
        score_chunks.append(scores)
        row_chunks.append(rows)
    if not score_chunks:
        empty = torch.empty(0, k, device=queries.device)
        return empty, empty.to(torch.int64)
    return torch.cat(score_chunks), torch.cat(row_chunks)
