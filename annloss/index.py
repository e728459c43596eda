"""Maximum-inner-product indexes over memory-bank embeddings, behind one interface.

:meth:`EmbeddingIndex.build` indexes the bank's filled slots; row ``i`` is bank slot ``i``.
Searches return bank slots, ``-1`` where fewer than ``k`` rows were found. The exact backends
keep a reference to the bank tensor, so a build costs nothing and later writes show in their
searches. IVF copies the rows and takes later writes through :meth:`EmbeddingIndex.update`. HNSW
is a snapshot. The memory-bank loss decides when to rebuild (see its ``refresh_every``).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Any

import faiss
import faiss.contrib.ivf_tools
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "INDEX_BACKENDS",
    "EmbeddingIndex",
    "FaissGpuFlatIndex",
    "FlatIndex",
    "HNSWIndex",
    "IVFIndex",
    "TorchIndex",
    "make_index",
]

#: FAISS's largest k (and nprobe) on the GPU without the cuVS backend.
FAISS_GPU_MAX_K = 2048

#: Names accepted by ``index=``.
INDEX_BACKENDS = ("auto", "flat", "ivf", "hnsw", "torch")

# Rows of the (queries x bank) score matrix computed at once by the torch backend; bounds its
# temporary memory to _TORCH_QUERY_CHUNK * M floats.
_TORCH_QUERY_CHUNK = 256

# Rows assigned to IVF cells per batch; bounds the (chunk x nlist) score matrix.
_IVF_ADD_CHUNK = 65_536

# With index="auto" on the CPU, banks with at least this many entries use IVF instead of exact
# torch search. In BENCHMARKS.md IVF was 2.5x (D = 128) and 3.2x (D = 768) faster per step than
# exact search at 65,536 entries, with negative recall@64 of 0.995. At 16,384 entries and
# D = 128 it was only 1.35x faster, too little to give up exactness.
AUTO_IVF_MIN_SIZE = 65_536


def _as_float32_numpy(tensor: Tensor) -> np.ndarray:
    # FAISS takes C-contiguous float32; a contiguous float32 CPU tensor is shared without a copy.
    return np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())


class EmbeddingIndex(ABC):
    """Inner-product search over a snapshot of bank embeddings.

    Attributes:
        exact: whether searches return exactly the top ``k`` inner products.
        num_rows: rows in the current snapshot, 0 before the first build.
    """

    exact: bool = False
    #: Whether :meth:`update` can replace rows without a rebuild.
    supports_update: bool = False
    #: Whether :meth:`build` keeps a reference to the embeddings instead of copying them. Such
    #: an index costs nothing to rebuild, and later writes to the tensor show in its searches.
    references_input: bool = False

    def __init__(self) -> None:
        self.num_rows = 0

    def update(self, rows: Tensor, embeddings: Tensor) -> None:
        """Replace (or append) ``rows`` of the snapshot with ``(len(rows), D)`` ``embeddings``."""
        raise NotImplementedError(f"{type(self).__name__} cannot update rows; rebuild it instead")

    @abstractmethod
    def build(self, embeddings: Tensor) -> None:
        """Index ``embeddings`` of shape ``(M, D)``, replacing any earlier snapshot."""

    @abstractmethod
    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Return ``(scores, rows)`` of shape ``(Q, k)`` for ``1 <= k <= num_rows``."""

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Return the ``k`` rows with the largest inner product for each query.

        Args:
            queries: ``(Q, D)``.
            k: candidates per query, ``>= 1``; clipped to the snapshot size.

        Returns:
            ``(scores, rows)``: float32 ``(Q, k')`` inner products in descending order and int64
            ``(Q, k')`` rows, ``-1`` where an approximate index found fewer candidates, with
            ``k' = min(k, num_rows)``. Both are on the queries' device.
        """
        if self.num_rows == 0:
            raise RuntimeError("the index is empty; call build() with the bank embeddings first")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, rows = self._search(queries, min(k, self.num_rows))
        return scores.to(queries.device), rows.to(device=queries.device, dtype=torch.int64)


class _ReferenceIndex(EmbeddingIndex):
    """Base of the exact backends that search the given tensor itself.

    A build keeps a reference to the tensor, not a copy, so it costs nothing and writes to the
    tensor show in later searches.
    """

    exact = True
    references_input = True

    def __init__(self) -> None:
        super().__init__()
        self._embeddings: Tensor | None = None

    def build(self, embeddings: Tensor) -> None:
        self._embeddings = embeddings.detach()
        self.num_rows = embeddings.shape[0]


class TorchIndex(_ReferenceIndex):
    """Exact search by chunked matrix product and ``torch.topk``, on any device."""

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        assert self._embeddings is not None
        database = self._embeddings.to(torch.float32)
        score_chunks, row_chunks = [], []
        for start in range(0, queries.shape[0], _TORCH_QUERY_CHUNK):
            block = queries[start : start + _TORCH_QUERY_CHUNK].to(database) @ database.T
            scores, rows = torch.topk(block, k, dim=1)
            score_chunks.append(scores)
            row_chunks.append(rows)
        if not score_chunks:
            empty = torch.empty(0, k, device=queries.device)
            return empty, empty.to(torch.int64)
        return torch.cat(score_chunks), torch.cat(row_chunks)


class _FaissIndex(EmbeddingIndex):
    """Shared search of the FAISS backends on CPU float32 arrays."""

    def __init__(self) -> None:
        super().__init__()
        self._index: Any = None

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores, rows = self._index.search(_as_float32_numpy(queries), k)
        return torch.from_numpy(scores), torch.from_numpy(rows)


class FlatIndex(_ReferenceIndex):
    """Exact search with FAISS's brute-force ``faiss.knn`` on the CPU.

    A float32 CPU tensor reaches FAISS without a copy. Other dtypes are converted at each search.
    """

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        assert self._embeddings is not None
        scores, rows = faiss.knn(
            _as_float32_numpy(queries),
            _as_float32_numpy(self._embeddings),
            k,
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        return torch.from_numpy(scores), torch.from_numpy(rows)


class IVFIndex(_FaissIndex):
    """Approximate search with ``faiss.IndexIVFFlat``: inverted lists over k-means cells.

    A query scans the full-width vectors of the ``nprobe`` cells nearest to it, so with ``nlist``
    growing as ``sqrt(M)`` the vectors scanned per query grow as ``sqrt(M)`` too. The cells come
    from k-means on a sample of the snapshot, projected by PCA to ``quantizer_dim`` dimensions
    first: training and assigning rows to cells then cost ``quantizer_dim / D`` of the
    full-width cost, which decides the rebuild time of a million-entry bank on a CPU. Scores
    inside the cells stay exact inner products of the full vectors.

    Each build retrains the cells on the current snapshot, so they follow the drift of the
    embeddings. :meth:`update` replaces rows in between without retraining.

    Args:
        nlist: number of k-means cells. Default: ``4 * sqrt(M)``, at most
            ``M / training_points_per_cell``.
        nprobe: minimum cells visited per query. A search for ``k`` rows visits enough cells
            to hold about ``2 k`` rows. Default: 8. Higher is slower and closer to exact.
        training_points_per_cell: k-means trains on a random sample of this many rows per cell.
            Default: 32.
        quantizer_dim: PCA width in which the cells are trained and rows assigned. ``None``,
            or a value ``>= D``, assigns in the full width. Default: 128.
            NOTE: 128 kept recall@64 at 0.976 or more only on the benchmarks' synthetic
            geographic embeddings; embeddings whose structure spans more dimensions may need a
            larger width or ``nprobe`` (the loss's ``audit_every`` measures it).
        kmeans_iterations: k-means iterations per build. Default: 10.
        seed: seed of the training sample and of k-means. Default: 0.
    """

    supports_update = True

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int = 8,
        training_points_per_cell: int = 32,
        quantizer_dim: int | None = 128,
        kmeans_iterations: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("nlist", nlist, 1),
            ("nprobe", nprobe, 1),
            ("training_points_per_cell", training_points_per_cell, 1),
            ("quantizer_dim", quantizer_dim, 1),
            ("kmeans_iterations", kmeans_iterations, 1),
        ):
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        self.nlist = nlist
        self.nprobe = nprobe
        self.training_points_per_cell = training_points_per_cell
        self.quantizer_dim = quantizer_dim
        self.kmeans_iterations = kmeans_iterations
        self.seed = seed

    def _train_quantizer(self, data: np.ndarray, nlist: int) -> Any:
        """Train the cells and return a FAISS index of the ``nlist`` centroids, PCA included.

        The PCA map and the centroids are also kept as torch tensors for :meth:`_assign`.
        """
        size, dim = data.shape
        rng = np.random.default_rng(self.seed)
        num_samples = min(size, nlist * self.training_points_per_cell)
        sample = data[np.sort(rng.choice(size, num_samples, replace=False))]
        reduce = self.quantizer_dim is not None and self.quantizer_dim < dim
        pca = None
        if reduce:
            pca = faiss.PCAMatrix(dim, self.quantizer_dim)
            pca.train(sample)
            sample = pca.apply(sample)
        kmeans = faiss.Kmeans(
            sample.shape[1],
            nlist,
            niter=self.kmeans_iterations,
            seed=self.seed,
            # The sample size is chosen above. These keep FAISS from subsampling it again and
            # from warning about fewer than 39 points per cell.
            max_points_per_centroid=self.training_points_per_cell,
            min_points_per_centroid=1,
        )
        kmeans.train(sample)
        centroids = faiss.IndexFlatL2(sample.shape[1])
        centroids.add(kmeans.centroids)
        self._centroids = torch.from_numpy(kmeans.centroids.copy())
        self._half_sq_norms = 0.5 * (self._centroids**2).sum(dim=1)
        self._projection = None
        if pca is None:
            return centroids
        # FAISS's linear transform is y = A x + b with A stored row-major as (d_out, d_in).
        projection = faiss.vector_to_array(pca.A).reshape(self.quantizer_dim, dim)
        self._projection = torch.from_numpy(projection.copy())
        self._projection_bias = torch.from_numpy(faiss.vector_to_array(pca.b).copy())
        # FAISS's Python constructors keep references to the parts, so they stay alive.
        return faiss.IndexPreTransform(pca, centroids)

    def _assign(self, data: np.ndarray) -> np.ndarray:
        """Return the cell of each row of ``data``: its nearest centroid in the PCA space.

        It applies the same rule as FAISS's quantizer with torch's matrix product. On this
        project's CPUs that product was 3 to 4 times faster than FAISS's brute-force search.
        """
        points = torch.from_numpy(data)
        if self._projection is not None:
            points = torch.addmm(self._projection_bias, points, self._projection.T)
        scores = points @ self._centroids.T - self._half_sq_norms
        return scores.argmax(dim=1).numpy().astype(np.int64)

    def _add(self, index: Any, data: np.ndarray, ids: np.ndarray) -> None:
        faiss.contrib.ivf_tools.add_preassigned(index, data, self._assign(data), ids)

    def build(self, embeddings: Tensor) -> None:
        size, dim = embeddings.shape
        nlist = self.nlist or int(4 * math.sqrt(size))
        nlist = max(1, min(nlist, size // self.training_points_per_cell))
        data = _as_float32_numpy(embeddings)

        quantizer = self._train_quantizer(data, nlist)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # A hash-table direct map makes removing a row by id cost O(1) instead of a scan of
        # every inverted list.
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        # Assigning a million rows takes tens of seconds on two cores, so show progress.
        starts = range(0, size, _IVF_ADD_CHUNK)
        progress = tqdm(
            starts,
            desc="IVF add",
            unit="chunk",
            leave=False,
            disable=None if size > 4 * _IVF_ADD_CHUNK else True,
        )
        for start in progress:
            block = data[start : start + _IVF_ADD_CHUNK]
            self._add(index, block, np.arange(start, start + len(block), dtype=np.int64))
        index.nprobe = min(self.nprobe, nlist)
        # The IVF index keeps only a raw pointer to its quantizer; this reference keeps it alive.
        self._quantizer = quantizer
        self._index = index
        self.num_rows = size

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        # The cells probed must hold enough rows for k results: a wide search (the loss widens
        # it when candidates turn out to be false negatives) probes more cells instead of
        # returning -1 padding from the same few.
        rows_per_cell = self.num_rows / self._index.nlist
        nprobe = max(self._index.nprobe, math.ceil(2 * k / max(rows_per_cell, 1.0)))
        parameters = faiss.SearchParametersIVF(nprobe=min(nprobe, self._index.nlist))
        scores, rows = self._index.search(_as_float32_numpy(queries), k, params=parameters)
        return torch.from_numpy(scores), torch.from_numpy(rows)

    def update(self, rows: Tensor, embeddings: Tensor) -> None:
        """Replace ``rows`` in place: remove their old vectors and add the new ones.

        The k-means cells stay those of the last build, so assignments degrade slowly as the
        embeddings drift; a periodic rebuild retrains them.
        """
        ids = rows.detach().cpu().numpy().astype(np.int64)
        self._index.remove_ids(ids[ids < self.num_rows])
        self._add(self._index, _as_float32_numpy(embeddings), ids)
        self.num_rows = max(self.num_rows, int(ids.max()) + 1) if ids.size else self.num_rows


class HNSWIndex(_FaissIndex):
    """Approximate search with ``faiss.IndexHNSWFlat``, a navigable small-world graph.

    Args:
        neighbours: graph degree (FAISS's ``M``). Default: 32.
        ef_construction: candidate list size while building. Default: 64.
        ef_search: candidate list size while searching, raised to ``k`` when smaller.
            Default: 128.
    """

    def __init__(self, neighbours: int = 32, ef_construction: int = 64, ef_search: int = 128):
        super().__init__()
        if neighbours < 2:
            raise ValueError(f"neighbours must be >= 2, got {neighbours}")
        self.neighbours = neighbours
        self.ef_construction = ef_construction
        self.ef_search = ef_search

    def build(self, embeddings: Tensor) -> None:
        index = faiss.IndexHNSWFlat(
            embeddings.shape[1], self.neighbours, faiss.METRIC_INNER_PRODUCT
        )
        index.hnsw.efConstruction = self.ef_construction
        index.add(_as_float32_numpy(embeddings))
        self._index = index
        self.num_rows = embeddings.shape[0]

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        self._index.hnsw.efSearch = max(self.ef_search, k)
        return super()._search(queries, k)


def faiss_has_gpu() -> bool:
    """Return whether the installed FAISS has GPU support and detects at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES: Any = None


def _gpu_resources() -> Any:
    # One StandardGpuResources per process: each reserves temporary GPU memory, and FAISS
    # reports sporadic errors when several are used concurrently.
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


class FaissGpuFlatIndex(TorchIndex):
    """Exact search with FAISS's GPU brute-force kNN directly on CUDA tensors.

    NOTE: this path has not yet run on a GPU; its tests skip without CUDA and FAISS GPU support.

    The bank stays a torch tensor: no index copy, no add or remove. FAISS on the GPU selects at
    most 2,048 candidates per query; larger ``k`` falls back to exact torch search for that call.
    """

    def __init__(self) -> None:
        super().__init__()
        if not faiss_has_gpu():
            raise RuntimeError(
                "this FAISS build has no GPU support or sees no GPU; install the FAISS GPU "
                "wheel (the 'gpu' extra) or use index='torch'"
            )
        # Importing torch_utils lets faiss.knn_gpu take torch tensors on their own device and
        # stream.
        import faiss.contrib.torch_utils  # noqa: F401

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        assert self._embeddings is not None
        if k > FAISS_GPU_MAX_K:
            return super()._search(queries, k)
        database = self._embeddings
        if database.dtype not in (torch.float32, torch.float16):
            database = database.float()
        scores, rows = faiss.knn_gpu(
            _gpu_resources(),
            queries.to(database.dtype).contiguous(),
            database.contiguous(),
            k,
            metric=faiss.METRIC_INNER_PRODUCT,
            device=database.device.index or 0,
        )
        return scores.float(), rows


def make_index(
    backend: str, device: torch.device, bank_size: int, **options: Any
) -> EmbeddingIndex:
    """Return a new index of ``backend`` for a bank on ``device`` with ``bank_size`` entries.

    ``"auto"`` picks FAISS's GPU brute force for a CUDA bank when FAISS has GPU support. Other
    accelerator banks get ``"torch"``, because the CPU FAISS backends would copy the bank to the
    host at every build. CPU banks get ``"flat"`` below ``AUTO_IVF_MIN_SIZE`` entries and
    ``"ivf"`` from there on. ``"flat"`` on a CUDA bank uses the GPU brute force. ``options`` go to the backend's
    constructor.

    Raises:
        ValueError: for an unknown backend, or a FAISS CPU backend with a bank on an accelerator.
    """
    if backend not in INDEX_BACKENDS:
        raise ValueError(f"index must be one of {INDEX_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and faiss_has_gpu():
            return FaissGpuFlatIndex(**options)
        if device.type == "cuda":
            warnings.warn(
                "FAISS has no GPU support here, so index='auto' searches the CUDA bank with "
                "exact torch matmul; install the FAISS GPU wheel for faster search",
                RuntimeWarning,
                stacklevel=3,
            )
        if device.type != "cpu":
            backend = "torch"
        else:
            backend = "ivf" if bank_size >= AUTO_IVF_MIN_SIZE else "torch"
    if backend == "flat" and device.type == "cuda" and faiss_has_gpu():
        return FaissGpuFlatIndex(**options)
    if backend in ("flat", "ivf", "hnsw") and device.type != "cpu":
        raise ValueError(
            f"index={backend!r} runs FAISS on the CPU but the bank is on {device} and this "
            "FAISS has no GPU support; use index='torch' or index='auto', or install the FAISS "
            "GPU wheel for index='flat'"
        )
    classes: dict[str, type[EmbeddingIndex]] = {
        "flat": FlatIndex,
        "ivf": IVFIndex,
        "hnsw": HNSWIndex,
        "torch": TorchIndex,
    }
    return classes[backend](**options)
