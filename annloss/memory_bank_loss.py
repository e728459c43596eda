"""Spatial contrastive loss with positives and hard negatives mined from a memory bank."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch import Tensor

from annloss._checks import check_ids, check_non_negative, check_positive, check_same_device
from annloss.coordinates import paired_distance, pairwise_distance
from annloss.distributed import all_reduce_sum, gather_batch, resolve_group, world_info
from annloss.functional import (
    cosine_to_euclidean,
    info_nce_from_masks,
    spatial_pair_masks,
    triplet_margin_from_masks,
    zero_loss,
)
from annloss.index import INDEX_BACKENDS, EmbeddingIndex, TorchIndex, make_index
from annloss.losses import Scales, _add_scale_stats, _radius_stats, _SpatialPairLoss
from annloss.memory_bank import NO_ID, MemoryBank
from annloss.radius import RadiusPolicy
from annloss.spatial_index import (
    BallTreeRadiusIndex,
    nearest_candidates,
    nearest_per_row,
)

__all__ = ["MemoryBankSpatialLoss"]

# Default refresh periods, in training steps, of an index that takes every bank write at once
# (only its IVF cells go stale, slowly) and of a snapshot index (whose newer rows stay unmined
# until the next rebuild).
_LIVE_REFRESH_EVERY = 1000
_SNAPSHOT_REFRESH_EVERY = 10
# Without an explicit refresh_every, the BallTree is rebuilt once capacity / _TREE_TURNOVER rows
# were written since its build. Those rows are scanned exactly at each step, so the threshold
# trades the scan against the O(M log M) rebuild.
_TREE_TURNOVER = 32

logger = logging.getLogger(__name__)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _drop_repeats(slots: Tensor) -> Tensor:
    """Replace the second and later occurrences of a slot within each row by ``-1``.

    With several scales one bank entry can be mined as a positive and as a negative of another
    scale, or as a negative of two scales. It must enter the loss once per anchor.
    """
    if slots.shape[1] < 2:
        return slots
    ordered, order = torch.sort(slots, dim=1, stable=True)
    repeated = torch.zeros_like(slots, dtype=torch.bool)
    repeated[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    unique = slots.clone()
    unique.scatter_(1, order, torch.where(repeated, -1, ordered))
    return unique


def _drop_index_after_load(module: MemoryBankSpatialLoss, incompatible_keys: Any) -> None:
    module._index = None
    module._tree = None


class MemoryBankSpatialLoss(_SpatialPairLoss):
    r"""Spatial contrastive loss whose positives and hard negatives also come from a memory bank.

    Each call scores every batch row (anchor) against three sets of references:

    1. the other rows of the batch, split by spatial distance exactly as in
       :class:`~annloss.SpatialContrastiveLoss` (positives below ``distance_threshold``,
       negatives from ``negative_threshold``);
    2. bank positives: up to ``max_positives`` bank entries within ``distance_threshold`` of the
       anchor, the spatially nearest first, found exactly (``positive_index``);
    3. bank hard negatives: the ``num_negatives`` bank entries most similar to the anchor (cosine)
       among those at least ``negative_threshold`` away, found through an inner-product index
       (``index``), exact or approximate. Candidates inside the negative radius are false
       negatives and are dropped; the search widens until ``num_negatives`` remain or the
       index is exhausted.

    A bank entry with the anchor's own id is never used, so an entity is not paired with its own
    stale copy. Bank entries are constants: the gradient flows only through the batch. The loss
    is then the in-batch formula over the union of references: for ``loss="infonce"``,

    .. math::
        \ell(a, p) = -\log \frac{e^{s_{ap}/\tau}}{e^{s_{ap}/\tau} + \sum_{n \in N(a)} e^{s_{an}/\tau}}

    averaged over positive pairs; for ``loss="triplet"``,
    :math:`\max(0, d_{ap} - d_{an} + m)` averaged over triplets with a positive loss.

    Order of operations (the MoCo order): the batch is scored against the bank as it was before
    the call, then, in training mode only, the batch enters the bank as L2-normalised, detached
    embeddings. While the bank contains fewer than ``min_bank_size`` entries, or during the first
    ``warmup_steps`` steps, nothing is mined and the result equals the in-batch loss exactly.

    Args:
        embedding_dim: width ``D`` of the embeddings (for GeoLM-style ``[geo, nl]`` vectors, the
            sum of both widths).
        distance_threshold: positive radius, km for ``metric="haversine"``, coordinate units for
            ``metric="euclidean"``.
        negative_threshold: radius from which pairs are negatives, same unit, ``>=
            distance_threshold``. Default: ``distance_threshold`` (no ignore band).
        radius: instead of ``distance_threshold``, a number or a radius policy from
            :mod:`annloss.radius` (``QuantileRadius``, ``KNNRadius``, ``TargetPositives``,
            ``FixedRadius``) that sets one positive and one negative radius per anchor.
        scales: instead of a single radius, ``[(radius, weight), ...]``: the loss is the
            weighted sum of one term per scale, each with its own masks. See
            :func:`annloss.radius.log_scales`.
        memory_size: bank capacity ``M`` in entries. Default: 65,536.
        num_negatives: hard negatives mined per anchor ``K``. Default: 64.
        max_positives: bank positives kept per anchor ``P``. Default: 64.
        loss: ``"infonce"``, ``"triplet"``, or a pytorch-metric-learning loss that accepts
            ``indices_tuple`` without labels (for example ``NTXentLoss``, ``SupConLoss``,
            ``TripletMarginLoss``, ``ContrastiveLoss``). A PML loss receives the L2-normalised
            batch as embeddings, the batch followed by the mined bank entries as ``ref_emb``,
            and the spatial pairs as ``indices_tuple``. Its memory cost is its own: NTXentLoss
            builds a positive-pairs x negative-pairs matrix. Default: ``"infonce"``.
        temperature: InfoNCE temperature :math:`\tau > 0`. Default: 0.1.
        margin: triplet margin :math:`m \ge 0` in unit-embedding distance. Default: 1.0.
        metric: ``"haversine"`` or ``"euclidean"``. Default: ``"haversine"``.
        coordinate_order: ``"lonlat"`` or ``"latlon"``. Default: ``"lonlat"``.
        min_bank_size: bank entries needed before mining starts. Default: ``num_negatives``.
        bank_dtype: storage dtype of bank embeddings. Default: float32.
        index: inner-product index for hard negatives. ``"torch"`` (matrix product and
            ``torch.topk``, on any device) and ``"flat"`` (FAISS brute force, or its GPU version
            for a CUDA bank) are exact and read the bank tensor directly, so they always see
            the current bank. ``"ivf"`` (FAISS ``IndexIVFFlat``) and ``"hnsw"`` (FAISS
            ``IndexHNSWFlat``) are approximate. ``"auto"`` picks FAISS's GPU brute force for a
            CUDA bank when FAISS has GPU support, ``"torch"`` on other accelerators, and on the
            CPU ``"torch"`` below ``AUTO_IVF_MIN_SIZE`` entries and ``"ivf"`` from there on.
            Default: ``"auto"``.
        index_options: keyword arguments of the index class, e.g. ``{"nprobe": 16}`` for IVF
            or ``{"ef_search": 256}`` for HNSW. Default: none.
        refresh_every: how often, in training steps, the mining structures are rebuilt. An
            incremental IVF index has its k-means cells retrained; a snapshot index (HNSW, or
            IVF with ``incremental=False``) is rebuilt, and between rebuilds the entries added
            since are not mined as negatives and overwritten slots are skipped. The BallTree is
            rebuilt too. Default: None, which means 1,000 steps for an incremental or exact index and
            10 for a snapshot index, and rebuilds the BallTree once 1/32 of the capacity has
            been written since its last build. While the bank fills, the index is also rebuilt
            each time the bank doubles, so its IVF cells follow the bank's size.
        positive_index: how bank positives are found: ``"balltree"`` (a scikit-learn
            ``BallTree``: k-nearest queries over the bank as it was at the tree's build, plus an
            exact scan of the entries written since) or ``"exact"`` (a scan of every bank entry,
            one matrix product of unit-sphere vectors for the haversine metric). Both return the
            same positives. The tree is sub-linear in the bank size. Default: ``"balltree"``.
        audit_every: every this many steps, mine the negatives of ``audit_sample`` anchors
            again by exact search over the current bank and report in
            ``stats["audit_negative_recall"]`` the fraction of them that the index found.
            0 turns the audit off. Default: 0.
        audit_sample: anchors per audit. Default: 32.
        warmup_steps: training steps during which the bank fills but nothing is mined, so
            the first entries come from a model that has started to learn. Default: 0.
        max_age: entries written more than this many steps ago are not mined. Default: None
            (any age).
        k_fetch: candidates fetched per anchor in the first negative search, ``>=
            num_negatives``. Candidates inside the negative radius are dropped, and anchors left
            with fewer than ``num_negatives`` are searched again with four times as many. The
            flat and IVF searches scan the same vectors whatever ``k`` is, so a larger first
            fetch saves repeated searches. Default: ``8 * num_negatives``.
        incremental: with an IVF index, apply every bank write to the index at once (remove
            the overwritten rows, add the new ones), so negatives are mined from the whole
            current bank and ``refresh_every`` only sets how often the k-means cells are
            retrained. The exact indexes always see the current bank, and HNSW cannot remove
            rows. Default: None, which means True for IVF.
        distributed: share the bank across the ranks of a torch.distributed process group
            (see below). Default: None, which means on when a process group with more than
            one rank is initialised.
        process_group: the torch.distributed group to share the bank in. Default: None, the
            default group.
        shard: split the bank over the ranks instead of keeping all of it on each: rank ``r``
            holds ``memory_size / world_size`` entries (see below). Needs an initialised
            process group when the loss is built, and ``memory_size`` divisible by the world
            size. Default: False.

    Under torch.distributed (for example DistributedDataParallel launched with ``torchrun``)
    every call gathers the batch of every rank, in rank order and without gradient. Each rank
    scores its own anchors against the whole global batch and the bank, and writes the whole
    global batch into its bank, so the banks stay identical on all ranks. Quantile and batch
    kNN radii are computed on the global batch. Each rank returns
    ``world_size * (sum of its anchors' terms) / (number of terms on all ranks)``. The mean of
    the returned losses over ranks, which is what DDP's gradient averaging applies, therefore
    equals the loss of one process on the concatenated batch. The gradient flows through this
    rank's rows only, so a pair whose reference belongs to another rank contributes through
    its anchor alone. A pytorch-metric-learning ``loss`` reduces internally and returns its
    mean over this rank's anchors. Every rank must call the loss at every step, as with any
    collective, and batch sizes may differ between ranks. A loss that only some ranks call,
    such as an evaluation on rank 0, needs ``distributed=False``.

    With ``shard=True`` the global batch still reaches every rank, but each rank stores only
    the rows whose slot in one ring of ``memory_size`` entries falls in its range. The shards
    together therefore contain exactly what the unsharded bank would. Each step every rank
    searches its shard for the anchors of all ranks. The candidates are merged across ranks
    (the nearest positives and, per scale, the most similar negatives), and each rank receives
    the embeddings and coordinates that its anchors selected. With exact indexes the mined
    entries are those of the unsharded bank. The search costs the same per rank as without
    sharding (``N`` anchors against ``M / world_size`` entries instead of ``B`` against
    ``M``), and the memory falls by the world size. ``num_filtered_negatives`` then counts
    this shard's candidates for every rank's anchors, and ``audit_every`` is not available.

    ``state_dict()`` holds the bank (embeddings, coordinates, ids, write steps, pointer, fill
    count) and the step counter; the radius policies keep no state. After
    ``load_state_dict()`` the indexes are rebuilt over the loaded bank at the next call, so with
    the exact indexes (``"torch"``, ``"flat"``) the next losses equal those of a run that never
    stopped. An IVF or HNSW index is retrained at that point instead of at its scheduled
    refresh, so its approximate candidates may differ slightly. Under torch.distributed the
    banks are identical, so rank 0's state can be saved and loaded on every rank, with any
    world size. A sharded bank is saved and loaded per rank, with the same world size. Loading
    another rank's shard, or a shard into an unsharded loss, raises an error.

    Shape:
        - embeddings: ``(B, D)``; float16 and bfloat16 are scored in float32.
        - coordinates: ``(B, 2)``, degrees in ``coordinate_order`` or projected units.
        - ids: optional ``(B,)`` non-negative integer entity ids.
        - output: scalar.

    After each call ``stats`` holds ``num_positive_pairs``, ``num_batch_positive_pairs``,
    ``num_bank_positive_pairs``, ``num_negative_pairs``, ``num_bank_negative_pairs``,
    ``num_filtered_negatives`` (mined candidates dropped for lying inside the negative radius),
    ``bank_size`` (entries before this call's batch was added), ``used_bank``,
    ``mining_time_s`` (rebuilds included), ``index_build_time_s`` (time spent in this call
    rebuilding the IVF or HNSW index and the BallTree, or 0) and ``communication_time_s``
    (torch.distributed collectives, or 0). Pair counts are this rank's. It also has ``radius_min``,
    ``radius_median`` and ``radius_max`` of the first scale's positive radii and, with several
    scales, each scale's radii, pair counts and loss under ``scale{i}_``. Pair counts and
    ``num_filtered_negatives`` are summed over scales.

    Example:
        >>> import torch
        >>> criterion = MemoryBankSpatialLoss(embedding_dim=8, distance_threshold=100.0,
        ...                                   memory_size=1024, num_negatives=4)
        >>> lonlat = torch.tensor([[2.35, 48.86], [2.29, 48.80], [-0.13, 51.51], [13.40, 52.52]])
        >>> for step in range(3):
        ...     loss = criterion(torch.randn(4, 8, requires_grad=True), lonlat)
        >>> criterion.stats["bank_size"]
        8
    """

    step: Tensor

    def __init__(
        self,
        *,
        embedding_dim: int,
        distance_threshold: float | None = None,
        negative_threshold: float | None = None,
        radius: float | RadiusPolicy | None = None,
        scales: Scales | None = None,
        memory_size: int = 65_536,
        num_negatives: int = 64,
        max_positives: int = 64,
        loss: str | BaseMetricLossFunction = "infonce",
        temperature: float = 0.1,
        margin: float = 1.0,
        metric: str = "haversine",
        coordinate_order: str = "lonlat",
        min_bank_size: int | None = None,
        bank_dtype: torch.dtype = torch.float32,
        index: str = "auto",
        index_options: dict[str, Any] | None = None,
        refresh_every: int | None = None,
        positive_index: str = "balltree",
        audit_every: int = 0,
        audit_sample: int = 32,
        warmup_steps: int = 0,
        max_age: int | None = None,
        incremental: bool | None = None,
        k_fetch: int | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        shard: bool = False,
    ) -> None:
        super().__init__(
            distance_threshold=distance_threshold,
            negative_threshold=negative_threshold,
            radius=radius,
            scales=scales,
            metric=metric,
            coordinate_order=coordinate_order,
        )
        if isinstance(loss, str):
            if loss not in ("infonce", "triplet"):
                raise ValueError(f"loss must be 'infonce' or 'triplet', got {loss!r}")
        elif not isinstance(loss, BaseMetricLossFunction):
            raise TypeError(
                "loss must be 'infonce', 'triplet' or a pytorch-metric-learning loss such as "
                f"NTXentLoss(), got {type(loss).__name__}"
            )
        elif len(self.scales) > 1:
            raise ValueError(
                "a pytorch-metric-learning loss takes one set of pairs, so it needs a single "
                "radius; use loss='infonce' or 'triplet' with scales="
            )
        if index not in INDEX_BACKENDS:
            raise ValueError(f"index must be one of {INDEX_BACKENDS}, got {index!r}")

        self.loss = loss
        self.temperature = check_positive("temperature", temperature)
        self.margin = check_non_negative("margin", margin)
        self.num_negatives = _check_count("num_negatives", num_negatives, 1)
        self.max_positives = _check_count("max_positives", max_positives, 0)
        self.min_bank_size = _check_count(
            "min_bank_size", num_negatives if min_bank_size is None else min_bank_size, 1
        )

        self.index = index
        self.index_options = dict(index_options or {})
        self.refresh_every = (
            None if refresh_every is None else _check_count("refresh_every", refresh_every, 1)
        )
        if positive_index not in ("exact", "balltree"):
            raise ValueError(
                f"positive_index must be 'exact' or 'balltree', got {positive_index!r}"
            )
        self.positive_index = positive_index

        self.audit_every = _check_count("audit_every", audit_every, 0)
        self.audit_sample = _check_count("audit_sample", audit_sample, 1)
        self.warmup_steps = _check_count("warmup_steps", warmup_steps, 0)
        self.max_age = None if max_age is None else _check_count("max_age", max_age, 0)
        if incremental and index == "hnsw":
            raise ValueError(
                "incremental=True needs an index that takes row updates ('ivf') or reads the "
                "bank directly ('flat', 'torch', 'auto'); FAISS's HNSW graph cannot remove "
                "rows, so index='hnsw' is rebuilt every refresh_every steps instead"
            )
        self.incremental = incremental
        self.k_fetch = _check_count(
            "k_fetch", 8 * self.num_negatives if k_fetch is None else k_fetch, self.num_negatives
        )

        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        self.distributed = distributed
        self.process_group = process_group

        self._index: EmbeddingIndex | None = None
        self._tree: BallTreeRadiusIndex | None = None
        # (step of the last build, bank pointer, bank rows added) that the index reflects.
        self._index_state = (0, 0, 0)
        # (step, bank pointer, bank rows added) when the BallTree was built.
        self._tree_state = (0, 0, 0)
        self._index_build_time_s = 0.0
        self._communication_time_s = 0.0
        # (B, S * K) index scores of the last _mine_negatives call's slots, -inf where empty.
        self._last_negative_scores = torch.empty(0)
        # Bank entries when the index was last built.
        self._index_build_size = 0
        # A loaded state replaces the bank, so the snapshot must be rebuilt.
        self.register_load_state_dict_post_hook(_drop_index_after_load)

        self.memory_size = _check_count("memory_size", memory_size, 1)
        self.shard = bool(shard)
        capacity = memory_size
        if self.shard:
            num_shards, shard_rank = self._check_shard_setup(distributed, audit_every)
            capacity = memory_size // num_shards
        self.bank = MemoryBank(
            capacity, _check_count("embedding_dim", embedding_dim, 1), dtype=bank_dtype
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        if self.shard:
            # The shards split one ring of memory_size slots into world_size ranges; the ring's
            # write count decides which rows of a step go to which shard.
            self.register_buffer("global_num_added", torch.zeros((), dtype=torch.int64))
            self.register_buffer("num_shards", torch.tensor(num_shards))
            self.register_buffer("shard_rank", torch.tensor(shard_rank))
        self.stats: dict[str, float] = {}

    @property
    def embedding_dim(self) -> int:
        return self.bank.embedding_dim

    @property
    def bank_size(self) -> int:
        """Number of bank entries, summed over all shards with ``shard=True``."""
        return self._global_bank_size() if self.shard else len(self.bank)

    def forward(self, embeddings: Tensor, coordinates: Tensor, ids: Tensor | None = None) -> Tensor:
        unit, coordinates, batch_distance, self_pairs = self.batch_context(embeddings, coordinates)
        if unit.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings have width {unit.shape[1]} but this loss was built with "
                f"embedding_dim={self.embedding_dim}; pass the width of the concatenated "
                "embedding to the constructor"
            )
        check_same_device(unit, self.bank.embeddings, "the memory bank buffers")
        ids = check_ids(ids, unit.shape[0], unit.device)
        distributed = resolve_group(self.distributed)
        if self.shard and (
            not distributed
            or torch.distributed.get_world_size(self.process_group) != int(self.num_shards)
        ):
            raise RuntimeError(
                f"this loss keeps one of {int(self.num_shards)} bank shards (shard=True) and "
                "must be called with the process group it was built in"
            )
        batch_size = unit.shape[0]

        # The batch references: this rank's rows, or under torch.distributed every rank's rows
        # in rank order, this rank's with their gradient and the others' detached.
        local = slice(0, batch_size)
        references, all_coordinates, all_ids = unit, coordinates, ids
        all_distance, all_self_pairs = batch_distance, self_pairs
        self._communication_time_s = 0.0
        if distributed:
            started = time.perf_counter()
            gathered = gather_batch(unit.detach(), coordinates, ids, self.process_group)
            self._communication_time_s += time.perf_counter() - started
            local = gathered.local
            references = torch.cat(
                [gathered.embeddings[: local.start], unit, gathered.embeddings[local.stop :]]
            )
            all_coordinates = gathered.coordinates
            all_ids = gathered.ids if bool((gathered.ids != NO_ID).any()) else None
            all_distance = pairwise_distance(
                all_coordinates,
                all_coordinates,
                metric=self.metric,
                coordinate_order=self.coordinate_order,
            )
            all_self_pairs = torch.eye(
                all_coordinates.shape[0], dtype=torch.bool, device=unit.device
            )
            batch_distance, self_pairs = all_distance[local], all_self_pairs[local]
            ids = None if all_ids is None else all_ids[local]

        # Bank entries before this call: this rank's bank, or every shard together.
        bank_size = self.bank_size
        if self.shard and self.training and all_coordinates.shape[0] > self.memory_size:
            raise ValueError(
                f"shard=True needs memory_size ({self.memory_size}) >= the rows all ranks pass "
                f"in one step ({all_coordinates.shape[0]}); increase memory_size"
            )
        used_bank = (
            bank_size >= self.min_bank_size
            and all_coordinates.shape[0] > 0
            and int(self.step) >= self.warmup_steps
        )
        started = time.perf_counter()
        self._index_build_time_s = 0.0
        bank_nearest = None
        if used_bank and any(policy.uses_bank for policy, _ in self.scales):

            def bank_nearest(k: int) -> Tensor:
                if self.shard:
                    return self._sharded_nearest(all_coordinates, all_ids, k, None)[1]
                return self._nearest_bank_entries(all_coordinates, all_ids, bank_size, k, None)[1]

        # Radii come from the whole (gathered) batch, so a quantile or a batch kNN radius is
        # the one a single process would compute on the concatenated batch.
        all_radii = self.scale_radii(all_distance, all_self_pairs, bank_nearest)
        radii = [
            (positive[local], negative[local], weight) for positive, negative, weight in all_radii
        ]
        # A zero weight removes its scale from mining too, so it cannot change the other terms.
        active = [(index, *scale) for index, scale in enumerate(radii) if scale[2] > 0]
        used_bank = used_bank and bool(active)
        if active:
            positive_radius = torch.stack([positive for _, positive, _, _ in active])
            negative_radius = torch.stack([negative for _, _, negative, _ in active])
        audit_recall: float | None = None
        bank_rows = None
        num_filtered = 0
        if used_bank and self.shard:
            weighted = [(p, n) for p, n, w in all_radii if w > 0]
            slots, bank_rows, num_filtered = self._mine_sharded(
                references.detach(),
                all_coordinates,
                all_ids,
                torch.stack([p for p, _ in weighted]).max(dim=0).values,
                torch.stack([n for _, n in weighted]),
                local,
                gathered.sizes,
            )
        elif used_bank:
            positive_slots = self._mine_positives(
                coordinates, ids, bank_size, positive_radius.max(dim=0).values
            )
            negative_slots, num_filtered = self._mine_negatives(
                unit.detach(), coordinates, ids, bank_size, negative_radius
            )
            slots = _drop_repeats(torch.cat([positive_slots, negative_slots], dim=1))
        else:
            slots = torch.full((unit.shape[0], 0), -1, device=unit.device)
        mining_time_s = time.perf_counter() - started
        if used_bank and self.audit_every and int(self.step) % self.audit_every == 0:
            audit_recall = self._audit(
                unit.detach(), coordinates, ids, bank_size, negative_radius, negative_slots
            )

        similarity, distance, excluded = self._assemble(
            unit, references, coordinates, batch_distance, self_pairs, slots, bank_rows
        )
        num_batch = references.shape[0]
        terms: list[tuple[float, Tensor, int]] = []
        stats: dict[str, Any] = {}
        stats.update(_radius_stats("", radii[0][0]))
        for index, positive, negative, weight in active:
            positive_mask, negative_mask = spatial_pair_masks(
                distance, positive[:, None], negative[:, None], exclude=excluded
            )
            # ``terms_in_mean`` is the number of terms ``value`` averages over.
            if isinstance(self.loss, BaseMetricLossFunction):
                value = self._metric_learning_loss(
                    unit, references, positive_mask, negative_mask, slots, bank_rows
                )
                terms_in_mean = 1
            elif self.loss == "infonce":
                value, terms_in_mean = info_nce_from_masks(
                    similarity, positive_mask, negative_mask, self.temperature
                )
            else:
                value, _, terms_in_mean = triplet_margin_from_masks(
                    cosine_to_euclidean(similarity), positive_mask, negative_mask, self.margin
                )
            terms.append((weight, value, terms_in_mean))
            counts = {
                "num_positive_pairs": int(positive_mask.sum()),
                "num_batch_positive_pairs": int(positive_mask[:, :num_batch].sum()),
                "num_negative_pairs": int(negative_mask.sum()),
                "num_batch_negative_pairs": int(negative_mask[:, :num_batch].sum()),
            }
            counts["num_bank_positive_pairs"] = (
                counts["num_positive_pairs"] - counts["num_batch_positive_pairs"]
            )
            counts["num_bank_negative_pairs"] = (
                counts["num_negative_pairs"] - counts["num_batch_negative_pairs"]
            )
            _add_scale_stats(stats, index, len(radii), positive, value, counts)
        loss = self._reduce(unit, terms, distributed)
        stats.pop("num_batch_negative_pairs", None)
        stats.update(
            {
                "num_filtered_negatives": num_filtered,
                "bank_size": bank_size,
                "used_bank": used_bank,
                "mining_time_s": mining_time_s,
                "index_build_time_s": self._index_build_time_s,
                "audit_negative_recall": audit_recall,
                "communication_time_s": self._communication_time_s,
            }
        )
        self.stats = stats

        logger.debug(
            "step %d: %d bank positives, %d bank negatives, %d filtered, mining %.1f ms",
            int(self.step),
            stats.get("num_bank_positive_pairs", 0),
            stats.get("num_bank_negative_pairs", 0),
            num_filtered,
            1000 * mining_time_s,
        )
        if self.training:
            if self.shard:
                written = self._write_shard(references.detach(), all_coordinates, all_ids)
            else:
                written = self.bank.add(
                    references.detach(), all_coordinates, all_ids, step=int(self.step)
                )
            index = self._index
            if index is not None and not index.references_input and self._is_incremental(index):
                index.update(written, self.bank.embeddings[written])
                self._index_state = (
                    self._index_state[0],
                    int(self.bank.pointer),
                    int(self.bank.num_added),
                )
            self.step += 1
        return loss

    def _check_shard_setup(self, distributed: bool | None, audit_every: int) -> tuple[int, int]:
        """Return ``(world_size, rank)`` for ``shard=True``, or raise if sharding cannot work."""
        if distributed is False or not resolve_group(None):
            raise RuntimeError(
                "shard=True splits the bank across the ranks of a torch.distributed process "
                "group: call torch.distributed.init_process_group(...) with more than one rank "
                "before building the loss, or use shard=False"
            )
        if audit_every:
            raise ValueError("audit_every needs shard=False: the audit searches the whole bank")
        rank, world_size = world_info(self.process_group)
        if self.memory_size % world_size:
            raise ValueError(
                f"shard=True needs memory_size ({self.memory_size}) divisible by the world size "
                f"({world_size}); use memory_size={self.memory_size // world_size * world_size}"
            )
        return world_size, rank

    def _global_bank_size(self) -> int:
        """Entries in all shards together."""
        return min(int(self.global_num_added), self.memory_size)

    @torch.no_grad()
    def _write_shard(self, embeddings: Tensor, coordinates: Tensor, ids: Tensor | None) -> Tensor:
        """Write the rows of a global batch whose global slot lies in this rank's range.

        Global slots run over one ring of ``memory_size``, and rank ``r`` stores slots
        ``[r * capacity, (r + 1) * capacity)``. Writes reach a shard in slot order, so its own
        ring pointer follows the global one.
        """
        capacity = self.bank.capacity
        start = int(self.global_num_added) % self.memory_size
        offsets = torch.arange(embeddings.shape[0], device=embeddings.device)
        global_slots = (start + offsets) % self.memory_size
        mine = global_slots // capacity == int(self.shard_rank)
        if bool(mine.any()):
            first = int(global_slots[mine][0]) - int(self.shard_rank) * capacity
            if first != int(self.bank.pointer):
                raise RuntimeError(
                    f"this shard's next slot is {int(self.bank.pointer)} but the global ring "
                    f"writes slot {first}; each rank must load the state its own rank saved"
                )
        written = self.bank.add(
            embeddings[mine],
            coordinates[mine],
            None if ids is None else ids[mine],
            step=int(self.step),
        )
        self.global_num_added += embeddings.shape[0]
        return written

    def _merge_candidates(self, slots: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Merge every shard's candidates and keep the ``k`` with the smallest key per row.

        Args:
            slots: ``(R, C)`` global slots of this shard's candidates, ``-1`` padded.
            keys: ``(R, C)`` float64 ranking keys (spatial distance, or minus the similarity),
                ``inf`` where padded.

        Returns:
            ``(slots, keys)``, each ``(R, k)``, ties broken by slot as in a single bank.
        """
        started = time.perf_counter()
        packed = torch.cat([slots.to(torch.float64), keys], dim=1)
        pieces = [torch.empty_like(packed) for _ in range(int(self.num_shards))]
        torch.distributed.all_gather(pieces, packed, group=self.process_group)
        self._communication_time_s += time.perf_counter() - started
        width = slots.shape[1]
        all_slots = torch.cat([piece[:, :width] for piece in pieces], dim=1).to(torch.int64)
        all_keys = torch.cat([piece[:, width:] for piece in pieces], dim=1)
        finite = torch.isfinite(all_keys) & (all_slots >= 0)
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(all_slots)
        return nearest_per_row(
            rows[finite],
            all_slots[finite],
            all_keys[finite],
            slots.shape[0],
            k,
            return_distance=True,
        )

    def _sharded_nearest(
        self, coordinates: Tensor, ids: Tensor | None, k: int, radius: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_nearest_bank_entries` over every shard: ``(N, k)`` global slots, distances."""
        num_anchors = coordinates.shape[0]
        if len(self.bank):
            slots, distance = self._nearest_bank_entries(
                coordinates, ids, len(self.bank), k, radius
            )
        else:
            slots = torch.full((num_anchors, k), -1, dtype=torch.int64, device=coordinates.device)
            distance = torch.full(slots.shape, math.inf, dtype=torch.float64, device=slots.device)
        offset = int(self.shard_rank) * self.bank.capacity
        slots = torch.where(slots >= 0, slots + offset, -1)
        return self._merge_candidates(slots, distance, k)

    def _mine_sharded(
        self,
        unit: Tensor,
        coordinates: Tensor,
        ids: Tensor | None,
        positive_radius: Tensor,
        negative_radius: Tensor,
        local: slice,
        sizes: list[int],
    ) -> tuple[Tensor, tuple[Tensor, Tensor], int]:
        """Mine every rank's anchors in this shard, merge across shards, fetch this rank's rows.

        Every rank searches its shard for all ``N`` anchors of the global batch and the
        candidates are merged by spatial distance (positives) or similarity (negatives), so
        the result is what one bank holding every shard would give.

        Args:
            unit: ``(N, D)`` unit embeddings of the global batch.
            positive_radius: ``(N,)`` largest positive radius per anchor.
            negative_radius: ``(S, N)`` negative radius per scale and anchor.

        Returns:
            ``(slots, (embeddings, coordinates), num_filtered)``: this rank's ``(B, C)``
            global slots and the ``(B, C, D)`` and ``(B, C, 2)`` rows they hold, and the
            candidates this shard dropped inside a negative radius, for every rank's anchors.
        """
        num_anchors = unit.shape[0]
        num_scales = negative_radius.shape[0]
        k = self.num_negatives
        positive_slots, _ = self._sharded_nearest(
            coordinates, ids, self.max_positives, positive_radius
        )
        if len(self.bank):
            negative_slots, num_filtered = self._mine_negatives(
                unit, coordinates, ids, len(self.bank), negative_radius
            )
            # The index's own scores rank the merged candidates, as one bank's search does.
            keys = -self._last_negative_scores.to(torch.float64)
        else:
            negative_slots = torch.full(
                (num_anchors, num_scales * k), -1, dtype=torch.int64, device=unit.device
            )
            keys = torch.full(
                negative_slots.shape, math.inf, dtype=torch.float64, device=unit.device
            )
            num_filtered = 0
        filled = negative_slots >= 0
        offset = int(self.shard_rank) * self.bank.capacity
        negative_slots = torch.where(filled, negative_slots + offset, -1)
        # One merge per scale: rows of (anchor, scale), K candidates each.
        negative_slots, _ = self._merge_candidates(
            negative_slots.reshape(num_anchors * num_scales, k),
            keys.reshape(num_anchors * num_scales, k),
            k,
        )
        slots = _drop_repeats(
            torch.cat([positive_slots, negative_slots.reshape(num_anchors, -1)], dim=1)
        )
        return slots[local], self._exchange_rows(slots, sizes), num_filtered

    def _exchange_rows(self, slots: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor]:
        """Send each rank the shard rows its anchors selected; return this rank's.

        Every rank has the same merged ``(N, C)`` global ``slots``, so each computes what to
        send and how many rows to expect from each shard. Each distinct slot travels once per
        pair of ranks, embeddings in the bank dtype and coordinates in float64.

        Returns:
            ``(embeddings (B, C, D), coordinates (B, C, 2))`` of this rank's anchors, in the
            bank dtype and float64.
        """
        started = time.perf_counter()
        capacity = self.bank.capacity
        rank = int(self.shard_rank)
        owner = torch.where(slots >= 0, slots // capacity, -1)
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)

        def distinct_slots(block: slice, source: int) -> Tensor:
            # Sorted, so sender and receiver list the rows in the same order.
            return torch.unique(slots[block][owner[block] == source])

        send = [
            distinct_slots(slice(bounds[d], bounds[d + 1]), rank) - rank * capacity
            for d in range(len(sizes))
        ]
        local = slice(bounds[rank], bounds[rank + 1])
        expected = [distinct_slots(local, source) for source in range(len(sizes))]
        receive_sizes = [len(entries) for entries in expected]
        send_sizes = [len(entries) for entries in send]
        received = []
        for table in (self.bank.embeddings, self.bank.coordinates):
            output = table.new_empty(sum(receive_sizes), table.shape[1])
            # Gloo's list all_to_all needs equal sizes; the single-tensor form takes splits.
            torch.distributed.all_to_all_single(
                output,
                table[torch.cat(send)],
                output_split_sizes=receive_sizes,
                input_split_sizes=send_sizes,
                group=self.process_group,
            )
            received.append(output)

        # Position of every selected slot in the received rows: the sources' blocks follow
        # each other, each sorted by slot.
        local_slots = slots[local]
        row = torch.zeros_like(local_slots)
        start = 0
        for source, entries in enumerate(expected):
            chosen = owner[local] == source
            row[chosen] = start + torch.searchsorted(entries, local_slots[chosen])
            start += len(entries)
        if start == 0:
            # Nothing was selected, so one zero row serves the empty slots.
            received = [table.new_zeros(1, table.shape[1]) for table in received]
        # Empty slots point at row 0; the loss masks them out.
        self._communication_time_s += time.perf_counter() - started
        return received[0][row], received[1][row]

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # torch loads this module's buffers before the bank's, so the bank's settings are
        # checked first: a refused state must leave the step counter untouched too.
        saved_shards = state_dict.get(prefix + "num_shards")
        if self.shard and saved_shards is None:
            raise ValueError(
                "this state was saved by a loss with shard=False; load it into one built with "
                "shard=False (the whole bank on every rank)"
            )
        if not self.shard and saved_shards is not None:
            raise ValueError(
                f"this state is one shard of a bank split over {int(saved_shards)} ranks "
                "(shard=True); load it on the same rank of a run with that many ranks"
            )
        if self.shard:
            if int(saved_shards) != int(self.num_shards):
                raise ValueError(
                    f"this state is a shard of a bank split over {int(saved_shards)} ranks, but "
                    f"this run has {int(self.num_shards)}; resume with the same world size"
                )
            saved_rank = int(state_dict[prefix + "shard_rank"])
            if saved_rank != int(self.shard_rank):
                raise ValueError(
                    f"this state is the shard of rank {saved_rank} but is loaded on rank "
                    f"{int(self.shard_rank)}; each rank must load the file its own rank saved"
                )
        self.bank.check_state(
            state_dict.get(prefix + "bank.embeddings"),
            "memory_size",
            "bank_dtype",
            capacity_scale=int(self.num_shards) if self.shard else 1,
        )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _reduce(
        self, unit: Tensor, terms: list[tuple[float, Tensor, int]], distributed: bool
    ) -> Tensor:
        """Return the weighted sum of the scale terms ``(weight, mean, terms_in_mean)``.

        Under torch.distributed each mean is rescaled to ``world_size * local sum / global
        count``: the average over ranks, which DDP applies to gradients, is then the mean over
        every rank's terms, as one process would compute it on the concatenated batch. A
        pytorch-metric-learning loss reduces internally and keeps its local value.
        """
        if distributed and not isinstance(self.loss, BaseMetricLossFunction):
            world_size = torch.distributed.get_world_size(self.process_group)
            started = time.perf_counter()
            global_counts = all_reduce_sum(
                [float(count) for _, _, count in terms], unit.device, self.process_group
            )
            self._communication_time_s += time.perf_counter() - started
            terms = [
                (weight, value * (count * world_size / total), count)
                for (weight, value, count), total in zip(terms, global_counts)
                if total > 0
            ]
        total: Tensor | None = None
        for weight, value, _ in terms:
            total = weight * value if total is None else total + weight * value
        return zero_loss(unit) if total is None else total

    def _assemble(
        self,
        unit: Tensor,
        references: Tensor,
        coordinates: Tensor,
        batch_distance: Tensor,
        self_pairs: Tensor,
        slots: Tensor,
        bank_rows: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Concatenate batch and bank references into ``(B, N + C)`` matrices.

        ``references`` are the ``N`` batch rows (``N > B`` under torch.distributed), and
        ``batch_distance`` and ``self_pairs`` are ``(B, N)``. ``bank_rows`` contains the
        embeddings ``(B, C, D)`` and coordinates ``(B, C, 2)`` of ``slots`` when they come from
        other ranks' shards. By default they are read from this rank's bank.

        Returns:
            ``(similarity, spatial_distance, excluded)``: cosine similarities, spatial distances
            and the mask of pairs never used (self pairs and empty slots).
        """
        similarity = unit @ references.T
        if slots.shape[1] == 0:
            return similarity, batch_distance, self_pairs
        filled = slots >= 0
        if bank_rows is None:
            safe_slots = slots.clamp_min(0)
            bank_rows = (self.bank.embeddings[safe_slots], self.bank.coordinates[safe_slots])
        bank_similarity = torch.einsum("bd,bkd->bk", unit, bank_rows[0].to(unit.dtype))
        bank_distance = paired_distance(
            coordinates[:, None, :],
            bank_rows[1],
            metric=self.metric,
            coordinate_order=self.coordinate_order,
        )
        return (
            torch.cat([similarity, bank_similarity], dim=1),
            torch.cat([batch_distance, bank_distance], dim=1),
            torch.cat([self_pairs, ~filled], dim=1),
        )

    def _metric_learning_loss(
        self,
        unit: Tensor,
        batch_references: Tensor,
        positive_mask: Tensor,
        negative_mask: Tensor,
        slots: Tensor,
        bank_rows: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Score the mined pairs with the wrapped pytorch-metric-learning loss.

        The reference set is the batch followed by each distinct mined bank entry once, and
        the pairs reach the loss as ``indices_tuple=(a1, p, a2, n)`` with ``ref_emb``. Pairs of
        anchors without a positive or without a negative are dropped, as in the built-in losses.
        """
        num_batch = batch_references.shape[0]
        filled = slots >= 0
        unique_slots, inverse = torch.unique(slots[filled], return_inverse=True)
        columns = torch.arange(num_batch, device=unit.device).expand(unit.shape[0], -1)
        bank_columns = torch.full_like(slots, -1)
        bank_columns[filled] = num_batch + inverse
        columns = torch.cat([columns, bank_columns], dim=1)
        if bank_rows is None:
            bank_embeddings = self.bank.embeddings[unique_slots]
        else:
            # Every occurrence of a slot carries the same row, so any one of them will do.
            bank_embeddings = bank_rows[0].new_empty(len(unique_slots), unit.shape[1])
            bank_embeddings[inverse] = bank_rows[0][filled]
        references = torch.cat([batch_references, bank_embeddings.to(unit.dtype)])

        valid_anchor = (positive_mask.any(dim=1) & negative_mask.any(dim=1))[:, None]
        a1, positive_column = torch.nonzero(positive_mask & valid_anchor, as_tuple=True)
        a2, negative_column = torch.nonzero(negative_mask & valid_anchor, as_tuple=True)
        indices_tuple = (a1, columns[a1, positive_column], a2, columns[a2, negative_column])
        return self.loss(unit, indices_tuple=indices_tuple, ref_emb=references)

    def _fresh_slots(self, slots: Tensor) -> Tensor:
        """Mask of ``slots`` whose entries are at most ``max_age`` steps old."""
        assert self.max_age is not None
        return int(self.step) - self.bank.steps[slots] <= self.max_age

    @staticmethod
    def _same_id(ids: Tensor | None, bank_ids: Tensor) -> Tensor | None:
        """Mask of bank entries holding the anchor's own entity, or ``None`` without ids.

        ``bank_ids`` is ``(B, C)`` per-anchor candidates or ``(C,)`` shared by all anchors.
        """
        if ids is None:
            return None
        if bank_ids.ndim == 1:
            bank_ids = bank_ids[None, :]
        return (bank_ids == ids[:, None]) & (bank_ids != NO_ID)

    @torch.no_grad()
    def _nearest_bank_entries(
        self,
        coordinates: Tensor,
        ids: Tensor | None,
        bank_size: int,
        k: int,
        radius: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Return each anchor's ``k`` spatially nearest usable bank entries.

        Usable entries pass the age and same-entity filters. With ``radius`` (``(B,)``), only
        entries strictly inside the anchor's radius count (the bank positives); without it,
        the nearest whatever their distance (for density-adaptive radii).

        With ``positive_index="balltree"`` the tree covers the bank as it was at its build,
        minus the slots overwritten since, and an exact scan covers the rows written since.
        Both searches give the same entries up to ties in distance.

        Returns:
            ``(slots, distance)``, each ``(B, k)``, nearest first, padded with ``-1`` and
            ``inf``.
        """
        num_anchors = coordinates.shape[0]
        limit = (
            torch.full((num_anchors,), math.inf, dtype=torch.float64, device=coordinates.device)
            if radius is None
            else radius
        )
        options = {"metric": self.metric, "coordinate_order": self.coordinate_order}
        if self.positive_index == "exact":
            every_slot = torch.arange(bank_size, device=coordinates.device)
            rows, slots, distance = nearest_candidates(
                coordinates,
                self.bank.coordinates[:bank_size],
                every_slot,
                limit,
                k,
                usable=lambda rows, slots: self._usable_positives(ids, rows, slots),
                **options,
            )
        else:
            tree = self._positive_tree(bank_size)
            tree_state = self._tree_state[1:]

            def from_tree(rows: Tensor, slots: Tensor) -> Tensor:
                usable = self._usable_positives(ids, rows, slots)
                return usable & ~self.bank.overwritten_since(*tree_state, slots)

            rows, slots, distance = tree.query_nearest_usable(coordinates, limit, k, from_tree)
            recent = self.bank.slots_written_since(*tree_state)
            more = nearest_candidates(
                coordinates,
                self.bank.coordinates[recent],
                recent,
                limit,
                k,
                usable=lambda rows, slots: self._usable_positives(ids, rows, slots),
                **options,
            )
            rows = torch.cat([rows, more[0]])
            slots = torch.cat([slots, more[1]])
            distance = torch.cat([distance, more[2]])
        return nearest_per_row(rows, slots, distance, num_anchors, k, return_distance=True)

    def _mine_positives(
        self, coordinates: Tensor, ids: Tensor | None, bank_size: int, radius: Tensor | None = None
    ) -> Tensor:
        """Return ``(B, P)`` bank positive slots within ``radius``, nearest first.

        ``radius`` is ``(B,)``; by default the fixed positive radius of a single-radius loss.
        """
        if radius is None:
            assert self.distance_threshold is not None
            radius = torch.full(
                (coordinates.shape[0],),
                self.distance_threshold,
                dtype=torch.float64,
                device=coordinates.device,
            )
        return self._nearest_bank_entries(coordinates, ids, bank_size, self.max_positives, radius)[
            0
        ]

    def _usable_positives(self, ids: Tensor | None, rows: Tensor, slots: Tensor) -> Tensor:
        """Mask of candidate pairs that pass the age and same-entity filters."""
        keep = torch.ones_like(slots, dtype=torch.bool)
        if self.max_age is not None:
            keep &= self._fresh_slots(slots)
        if ids is not None:
            bank_ids = self.bank.ids[slots]
            keep &= (bank_ids != ids[rows]) | (bank_ids == NO_ID)
        return keep

    def _audit(
        self,
        unit: Tensor,
        coordinates: Tensor,
        ids: Tensor | None,
        bank_size: int,
        negative_radius: Tensor,
        negative_slots: Tensor,
    ) -> float:
        """Return the recall of the mined negatives against exact mining on a sample of anchors.

        Recall is the fraction of the negatives that exact search over the current bank would
        mine (same radius and id filters) that the index-based mining also found. It is
        computed outside the timed mining.
        """
        generator = torch.Generator().manual_seed(int(self.step))
        sample = torch.randperm(unit.shape[0], generator=generator)[: self.audit_sample]
        sample = sample.to(unit.device)
        expected, _ = self._mine_negatives(
            unit[sample],
            coordinates[sample],
            None if ids is None else ids[sample],
            bank_size,
            negative_radius[:, sample],
            exact=True,
        )
        found = negative_slots[sample]
        expected_filled = expected >= 0
        hits = (expected[:, :, None] == found[:, None, :]).any(dim=2) & expected_filled
        return float(hits.sum()) / max(int(expected_filled.sum()), 1)

    def _is_incremental(self, index: EmbeddingIndex) -> bool:
        """Return whether bank writes go into ``index`` at once instead of at a rebuild."""
        if index.references_input:
            return True
        return index.supports_update and self.incremental is not False

    def _refresh_period(self, index: EmbeddingIndex | None) -> int:
        if self.refresh_every is not None:
            return self.refresh_every
        if index is not None and self._is_incremental(index):
            return _LIVE_REFRESH_EVERY
        return _SNAPSHOT_REFRESH_EVERY

    def _negative_index(self, bank_size: int) -> EmbeddingIndex:
        """Return the inner-product index over the bank, rebuilt when it is due.

        An index that reads the bank tensor directly (flat, torch) is renewed at every call,
        which costs nothing and keeps it exact. An incremental IVF index receives every write
        and is retrained every ``refresh_every`` steps. Other indexes are snapshots rebuilt every
        ``refresh_every`` steps; the slots overwritten since are filtered out by the caller.
        Any index is also rebuilt once the bank has doubled since its build, while it fills.
        """
        step = int(self.step)
        index = self._index
        if (
            index is None
            or index.references_input
            or step - self._index_state[0] >= self._refresh_period(index)
            # A bank that doubled since the build needs more IVF cells, and "auto" may now
            # pick another backend.
            or bank_size >= 2 * self._index_build_size
        ):
            started = time.perf_counter()
            index = make_index(
                self.index, self.bank.embeddings.device, bank_size, **self.index_options
            )
            index.build(self.bank.embeddings[:bank_size])
            self._index = index
            self._index_build_size = bank_size
            self._index_state = (step, int(self.bank.pointer), int(self.bank.num_added))
            if not index.references_input:
                self._index_build_time_s += time.perf_counter() - started
        return index

    def _positive_tree(self, bank_size: int) -> BallTreeRadiusIndex:
        """Return the BallTree over bank coordinates, rebuilt when it is due.

        With an explicit ``refresh_every`` the tree follows that period. Otherwise it is rebuilt
        once the rows written since its build, which the positive mining scans exactly, reach
        ``1 / _TREE_TURNOVER`` of the capacity.
        """
        step = int(self.step)
        written = int(self.bank.num_added) - self._tree_state[2]
        if self.refresh_every is not None:
            due = step - self._tree_state[0] >= self.refresh_every
        else:
            due = written >= max(1, self.bank.capacity // _TREE_TURNOVER)
        if self._tree is None or due:
            started = time.perf_counter()
            self._tree = BallTreeRadiusIndex(self.metric, self.coordinate_order)
            self._tree.build(self.bank.coordinates[:bank_size])
            self._tree_state = (step, int(self.bank.pointer), int(self.bank.num_added))
            self._index_build_time_s += time.perf_counter() - started
        return self._tree

    @torch.no_grad()
    def _mine_negatives(
        self,
        unit: Tensor,
        coordinates: Tensor,
        ids: Tensor | None,
        bank_size: int,
        negative_radius: Tensor | None = None,
        *,
        exact: bool = False,
    ) -> tuple[Tensor, int]:
        """Return ``(B, S * K)`` hard-negative slots, ``K`` per scale, most similar first.

        Candidates come from the inner-product index over the bank. For each scale, candidates
        inside that scale's negative radius, with the anchor's id, or in slots overwritten since
        a snapshot index was built are dropped. Rows left with fewer than ``K`` survivors at some
        scale are searched again with four times as many candidates, until the whole index has
        been examined. With ``exact=True`` an exact index over the current bank replaces the
        mining index; the mining audit uses it as ground truth.

        Args:
            negative_radius: ``(S, B)`` negative radius of each scale and anchor. Default: the
                fixed ``negative_threshold``, one scale.

        Returns:
            ``(slots, num_filtered)``: slots padded with ``-1``, scale after scale, and the
            number of candidates dropped for lying inside a negative radius, among those ranked
            above each anchor's last kept one, summed over scales.
        """
        batch_size = unit.shape[0]
        if negative_radius is None:
            assert self.negative_threshold is not None
            negative_radius = torch.full(
                (1, batch_size), self.negative_threshold, dtype=torch.float64, device=unit.device
            )
        if exact:
            index: EmbeddingIndex = TorchIndex()
            index.build(self.bank.embeddings[:bank_size])
        else:
            index = self._negative_index(bank_size)
        snapshot_rows = index.num_rows
        num_scales = negative_radius.shape[0]
        k = self.num_negatives
        result = torch.full((num_scales, batch_size, k), -1, dtype=torch.int64, device=unit.device)
        result_scores = torch.full(
            (num_scales, batch_size, k), -math.inf, dtype=torch.float32, device=unit.device
        )
        pending = torch.ones(num_scales, batch_size, dtype=torch.bool, device=unit.device)
        rows = torch.arange(batch_size, device=unit.device)
        fetch = min(snapshot_rows, self.k_fetch)
        num_filtered = 0

        while rows.numel() > 0:
            scores, slots = index.search(unit[rows], fetch)
            found = slots >= 0
            slots = slots.clamp_min(0)
            distance = paired_distance(
                coordinates[rows][:, None, :],
                self.bank.coordinates[slots],
                metric=self.metric,
                coordinate_order=self.coordinate_order,
            )
            usable = found.clone()
            if not exact and not index.references_input:
                usable &= ~self.bank.overwritten_since(*self._index_state[1:], slots)
            same_id = self._same_id(None if ids is None else ids[rows], self.bank.ids[slots])
            if same_id is not None:
                usable &= ~same_id
            if self.max_age is not None:
                usable &= self._fresh_slots(slots)
            exhausted = fetch >= snapshot_rows
            position = torch.arange(slots.shape[1], device=unit.device)

            for scale in range(num_scales):
                waiting = pending[scale, rows]
                if not waiting.any():
                    continue
                too_close = found & (distance < negative_radius[scale, rows][:, None])
                accepted = usable & ~too_close
                rank = torch.cumsum(accepted.to(torch.int64), dim=1)
                selected = accepted & (rank <= k)
                count = selected.sum(dim=1)
                done = waiting & ((count == k) | exhausted)

                # Candidates examined per row: up to the last selected one, or all of them.
                examined = torch.where(count == k, (rank < k).sum(dim=1) + 1, slots.shape[1])
                counted = too_close & (position[None, :] < examined[:, None]) & done[:, None]
                num_filtered += int(counted.sum())

                keep = selected & done[:, None]
                row_index = rows[:, None].expand_as(slots)[keep]
                result[scale, row_index, (rank - 1)[keep]] = slots[keep]
                result_scores[scale, row_index, (rank - 1)[keep]] = scores[keep].float()
                pending[scale, rows[done]] = False

            rows = rows[pending[:, rows].any(dim=0)]
            fetch = min(snapshot_rows, fetch * 4)

        self._last_negative_scores = result_scores.permute(1, 0, 2).reshape(batch_size, -1)
        return result.permute(1, 0, 2).reshape(batch_size, num_scales * k), num_filtered

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss!r}, temperature={self.temperature}, margin={self.margin}, "
            f"num_negatives={self.num_negatives}, max_positives={self.max_positives}, "
            f"min_bank_size={self.min_bank_size}, index={self.index!r}, " + super().extra_repr()
        )
