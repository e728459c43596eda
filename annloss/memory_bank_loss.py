"""Spatial contrastive loss with positives and hard negatives mined from a memory bank."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch import Tensor

from annloss._checks import check_ids, check_non_negative, check_positive, check_same_device
from annloss.coordinates import (
    paired_distance,
)
from annloss.functional import (
    cosine_to_euclidean,
    info_nce_from_masks,
    triplet_margin_from_masks,
)
from annloss.index import INDEX_BACKENDS, EmbeddingIndex, TorchIndex, make_index
from annloss.losses import _SpatialPairLoss
from annloss.memory_bank import NO_ID, MemoryBank
from annloss.spatial_index import (
    BallTreeRadiusIndex,
    exact_radius_candidates,
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
        index: inner-product index for hard negatives. ``"flat"`` is exact (FAISS
            ``IndexFlatIP``, or FAISS's GPU brute force for a CUDA bank). ``"ivf"`` (FAISS
            ``IndexIVFFlat``) and ``"hnsw"`` (FAISS ``IndexHNSWFlat``) are approximate.
            ``"torch"`` is exact matmul + topk on any device. ``"auto"`` picks the GPU brute force
            for a CUDA bank when FAISS has GPU support, ``"torch"`` on other accelerators, and on
            the CPU ``"flat"`` below 262,144 entries and ``"ivf"`` from there on.
            Default: ``"auto"``.
        index_options: keyword arguments of the index class, e.g. ``{"nprobe": 64}`` for IVF
            or ``{"ef_search": 256}`` for HNSW. Default: none.
        refresh_every: rebuild the mining indexes every this many training steps. Between
            rebuilds, entries added since the last one are not mined as negatives and
            overwritten slots are skipped. Default: 1 (rebuild every step).
        positive_index: how bank positives are found: ``"exact"`` (a scan of every bank entry,
            one matrix product of unit-sphere vectors for the haversine metric) or
            ``"balltree"`` (a scikit-learn ``BallTree`` over the snapshot plus an exact scan of
            the entries added since). Both return the same positives. Default: ``"exact"``.
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
        incremental: with ``index="ivf"``, apply every bank write to the index at once
            (remove the overwritten rows, add the new ones), so negatives are mined from the
            whole current bank; ``refresh_every`` then only sets how often the k-means cells
            are retrained. Default: False.

    Shape:
        - embeddings: ``(B, D)``; float16 and bfloat16 are scored in float32.
        - coordinates: ``(B, 2)``, degrees in ``coordinate_order`` or projected units.
        - ids: optional ``(B,)`` non-negative integer entity ids.
        - output: scalar.

    After each call ``stats`` holds ``num_positive_pairs``, ``num_batch_positive_pairs``,
    ``num_bank_positive_pairs``, ``num_negative_pairs``, ``num_bank_negative_pairs``,
    ``num_filtered_negatives`` (mined candidates dropped for lying inside the negative radius),
    ``bank_size`` (entries before this call's batch was added), ``used_bank``, ``mining_time_s`` (index build included) and
    ``index_build_time_s`` (0 when the index was reused).

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
        distance_threshold: float,
        negative_threshold: float | None = None,
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
    ) -> None:
        super().__init__(
            distance_threshold=distance_threshold,
            negative_threshold=negative_threshold,
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

        self._index: EmbeddingIndex | None = None
        self._tree: BallTreeRadiusIndex | None = None
        # (step of the last build, bank pointer, bank rows added) that the index reflects.
        self._index_state = (0, 0, 0)
        # (step, bank pointer, bank rows added) when the BallTree was built.
        self._tree_state = (0, 0, 0)
        self._index_build_time_s = 0.0
        # A loaded state replaces the bank, so the snapshot must be rebuilt.
        self.register_load_state_dict_post_hook(_drop_index_after_load)

        self.bank = MemoryBank(
            _check_count("memory_size", memory_size, 1),
            _check_count("embedding_dim", embedding_dim, 1),
            dtype=bank_dtype,
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.stats: dict[str, float] = {}

    @property
    def embedding_dim(self) -> int:
        return self.bank.embedding_dim

    def forward(self, embeddings: Tensor, coordinates: Tensor, ids: Tensor | None = None) -> Tensor:
        unit, batch_positive, batch_negative = self.batch_pairs(embeddings, coordinates)
        if unit.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings have width {unit.shape[1]} but this loss was built with "
                f"embedding_dim={self.embedding_dim}; pass the width of the concatenated "
                "embedding to the constructor"
            )
        check_same_device(unit, self.bank.embeddings, "the memory bank buffers")
        ids = check_ids(ids, unit.shape[0], unit.device)
        coordinates = coordinates.to(device=unit.device, dtype=torch.float64)

        bank_size = len(self.bank)
        used_bank = (
            bank_size >= self.min_bank_size
            and unit.shape[0] > 0
            and int(self.step) >= self.warmup_steps
        )
        started = time.perf_counter()
        self._index_build_time_s = 0.0
        audit_recall: float | None = None
        if used_bank:
            positive_slots = self._mine_positives(coordinates, ids, bank_size)
            negative_slots, num_filtered = self._mine_negatives(
                unit.detach(), coordinates, ids, bank_size
            )
        else:
            positive_slots = torch.full((unit.shape[0], 0), -1, device=unit.device)
            negative_slots = positive_slots
            num_filtered = 0
        mining_time_s = time.perf_counter() - started
        if used_bank and self.audit_every and int(self.step) % self.audit_every == 0:
            audit_recall = self._audit(
                unit.detach(), coordinates, ids, bank_size, negative_slots
            )

        similarity, positive_mask, negative_mask = self._assemble(
            unit, batch_positive, batch_negative, positive_slots, negative_slots
        )
        if isinstance(self.loss, BaseMetricLossFunction):
            loss = self._metric_learning_loss(unit, positive_mask, negative_mask, positive_slots,
                                              negative_slots)
        elif self.loss == "infonce":
            loss, _ = info_nce_from_masks(similarity, positive_mask, negative_mask, self.temperature)
        else:
            distance = cosine_to_euclidean(similarity)
            loss, _, _ = triplet_margin_from_masks(
                distance, positive_mask, negative_mask, self.margin
            )

        num_batch_positive = int(batch_positive.sum())
        num_batch_negative = int(batch_negative.sum())
        self.stats = {
            "num_positive_pairs": int(positive_mask.sum()),
            "num_batch_positive_pairs": num_batch_positive,
            "num_bank_positive_pairs": int(positive_mask.sum()) - num_batch_positive,
            "num_negative_pairs": int(negative_mask.sum()),
            "num_bank_negative_pairs": int(negative_mask.sum()) - num_batch_negative,
            "num_filtered_negatives": num_filtered,
            "bank_size": bank_size,
            "used_bank": used_bank,
            "mining_time_s": mining_time_s,
            "index_build_time_s": self._index_build_time_s,
            "audit_negative_recall": audit_recall,
        }

        logger.debug(
            "step %d: %d bank positives, %d bank negatives, %d filtered, mining %.1f ms",
            int(self.step),
            self.stats["num_bank_positive_pairs"],
            self.stats["num_bank_negative_pairs"],
            num_filtered,
            1000 * mining_time_s,
        )
        if self.training:
            written = self.bank.add(unit.detach(), coordinates, ids, step=int(self.step))
            index = self._index
            if index is not None and not index.references_input and self._is_incremental(index):
                index.update(written, self.bank.embeddings[written])
                self._index_state = (
                    self._index_state[0], int(self.bank.pointer), int(self.bank.num_added)
                )
            self.step += 1
        return loss

    def _assemble(
        self,
        unit: Tensor,
        batch_positive: Tensor,
        batch_negative: Tensor,
        positive_slots: Tensor,
        negative_slots: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Concatenate batch and bank references into ``(B, B + P + K)`` matrices."""
        similarity = unit @ unit.T
        if positive_slots.shape[1] + negative_slots.shape[1] == 0:
            return similarity, batch_positive, batch_negative

        slots = torch.cat([positive_slots, negative_slots], dim=1)
        references = self.bank.embeddings[slots.clamp_min(0)].to(unit.dtype)
        bank_similarity = torch.einsum("bd,bkd->bk", unit, references)

        filled = slots >= 0
        num_positive_columns = positive_slots.shape[1]
        bank_positive = filled.clone()
        bank_positive[:, num_positive_columns:] = False
        bank_negative = filled.clone()
        bank_negative[:, :num_positive_columns] = False
        return (
            torch.cat([similarity, bank_similarity], dim=1),
            torch.cat([batch_positive, bank_positive], dim=1),
            torch.cat([batch_negative, bank_negative], dim=1),
        )

    def _metric_learning_loss(
        self,
        unit: Tensor,
        positive_mask: Tensor,
        negative_mask: Tensor,
        positive_slots: Tensor,
        negative_slots: Tensor,
    ) -> Tensor:
        """Score the mined pairs with the wrapped pytorch-metric-learning loss.

        The reference set is the batch followed by each distinct mined bank entry once, and
        the pairs reach the loss as ``indices_tuple=(a1, p, a2, n)`` with ``ref_emb``. Pairs of
        anchors without a positive or without a negative are dropped, as in the built-in losses.
        """
        batch_size = unit.shape[0]
        slots = torch.cat([positive_slots, negative_slots], dim=1)
        filled = slots >= 0
        unique_slots, inverse = torch.unique(slots[filled], return_inverse=True)
        columns = torch.arange(batch_size, device=unit.device).expand(batch_size, -1)
        bank_columns = torch.full_like(slots, -1)
        bank_columns[filled] = batch_size + inverse
        columns = torch.cat([columns, bank_columns], dim=1)
        references = torch.cat([unit, self.bank.embeddings[unique_slots].to(unit.dtype)])

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
    def _mine_positives(self, coordinates: Tensor, ids: Tensor | None, bank_size: int) -> Tensor:
        """Return ``(B, P)`` bank slots within the positive radius, nearest first, ``-1`` padded.

        With ``positive_index="balltree"`` the tree covers the bank as it was at its build,
        minus the slots overwritten since, and an exact scan covers the rows written since.
        Both searches give the same positives.
        """
        radius = self.distance_threshold
        options = {"metric": self.metric, "coordinate_order": self.coordinate_order}
        if self.positive_index == "exact":
            slots = torch.arange(bank_size, device=coordinates.device)
            rows, slots, distance = exact_radius_candidates(
                coordinates, self.bank.coordinates[:bank_size], slots, radius, **options
            )
            keep = self._usable_positives(ids, rows, slots)
            rows, slots, distance = rows[keep], slots[keep], distance[keep]
        else:
            tree = self._positive_tree(bank_size)
            tree_state = self._tree_state[1:]

            def from_tree(rows: Tensor, slots: Tensor, distance: Tensor) -> tuple[Tensor, ...]:
                keep = self._usable_positives(ids, rows, slots)
                keep &= ~self.bank.overwritten_since(*tree_state, slots)
                return rows[keep], slots[keep], distance[keep]

            # The nearest few, with room for those the filters drop. An anchor left short while
            # its farthest fetched row is still inside the radius gets a full radius query.
            *found, saturated = tree.query_nearest(coordinates, radius, self.max_positives + 16)
            rows, slots, distance = from_tree(*found)
            kept = torch.bincount(rows, minlength=coordinates.shape[0])
            short = torch.nonzero(saturated & (kept < self.max_positives)).flatten()
            if short.numel() > 0:
                more_rows, more_slots, more_distance = from_tree(*tree.query(coordinates[short], radius))
                again = torch.isin(rows, short)
                rows = torch.cat([rows[~again], short[more_rows]])
                slots = torch.cat([slots[~again], more_slots])
                distance = torch.cat([distance[~again], more_distance])

            recent = self.bank.slots_written_since(*tree_state)
            recent_rows, recent_slots, recent_distance = exact_radius_candidates(
                coordinates, self.bank.coordinates[recent], recent, radius, **options
            )
            keep = self._usable_positives(ids, recent_rows, recent_slots)
            rows = torch.cat([rows, recent_rows[keep]])
            slots = torch.cat([slots, recent_slots[keep]])
            distance = torch.cat([distance, recent_distance[keep]])
        return nearest_per_row(rows, slots, distance, coordinates.shape[0], self.max_positives)

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
            exact=True,
        )
        found = negative_slots[sample]
        expected_filled = expected >= 0
        hits = (expected[:, :, None] == found[:, None, :]).any(dim=2) & expected_filled
        return float(hits.sum()) / max(int(expected_filled.sum()), 1)

    def _is_incremental(self, index: EmbeddingIndex) -> bool:
        """Whether bank writes go into ``index`` at once instead of waiting for a rebuild."""
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
        """
        step = int(self.step)
        index = self._index
        if (
            index is None
            or index.references_input
            or step - self._index_state[0] >= self._refresh_period(index)
        ):
            started = time.perf_counter()
            index = make_index(
                self.index, self.bank.embeddings.device, bank_size, **self.index_options
            )
            index.build(self.bank.embeddings[:bank_size])
            self._index = index
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
        *,
        exact: bool = False,
    ) -> tuple[Tensor, int]:
        """Return ``(B, K)`` hard-negative slots, most similar first, ``-1`` padded.

        Candidates come from the inner-product index over the bank snapshot. Candidates inside
        the negative radius, with the anchor's id, or in slots overwritten since the snapshot
        are dropped. Rows left with fewer than ``K`` survivors are searched again with four times
        as many candidates, until the whole snapshot has been examined. With ``exact=True`` a
        fresh exact index over the current bank replaces the snapshot, which the mining audit
        uses as ground truth.

        Returns:
            ``(slots, num_filtered)``, where ``num_filtered`` counts candidates dropped for lying
            inside the negative radius, among those ranked above each anchor's last kept one.
        """
        if exact:
            index: EmbeddingIndex = TorchIndex()
            index.build(self.bank.embeddings[:bank_size])
        else:
            index = self._negative_index(bank_size)
        snapshot_rows = index.num_rows
        batch_size = unit.shape[0]
        k = self.num_negatives
        result = torch.full((batch_size, k), -1, dtype=torch.int64, device=unit.device)
        rows = torch.arange(batch_size, device=unit.device)
        fetch = min(snapshot_rows, self.k_fetch)
        num_filtered = 0

        while rows.numel() > 0:
            _, slots = index.search(unit[rows], fetch)
            found = slots >= 0
            slots = slots.clamp_min(0)
            distance = paired_distance(
                coordinates[rows][:, None, :],
                self.bank.coordinates[slots],
                metric=self.metric,
                coordinate_order=self.coordinate_order,
            )
            too_close = found & (distance < self.negative_threshold)
            accepted = found & ~too_close
            if not exact:
                accepted &= ~self.bank.overwritten_since(*self._index_state[1:], slots)
            same_id = self._same_id(None if ids is None else ids[rows], self.bank.ids[slots])
            if same_id is not None:
                accepted &= ~same_id
            if self.max_age is not None:
                accepted &= self._fresh_slots(slots)

            rank = torch.cumsum(accepted.to(torch.int64), dim=1)
            selected = accepted & (rank <= k)
            count = selected.sum(dim=1)
            done = (count == k) | (fetch >= snapshot_rows)

            # Candidates examined per row: up to the last selected one, or all when too few remain.
            examined = torch.where(count == k, (rank < k).sum(dim=1) + 1, slots.shape[1])
            position = torch.arange(slots.shape[1], device=unit.device)
            counted = too_close & (position[None, :] < examined[:, None]) & done[:, None]
            num_filtered += int(counted.sum())

            keep_rows = selected & done[:, None]
            row_index = rows[:, None].expand_as(slots)[keep_rows]
            result[row_index, (rank - 1)[keep_rows]] = slots[keep_rows]

            rows = rows[~done]
            fetch = min(snapshot_rows, fetch * 4)

        return result, num_filtered

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss!r}, temperature={self.temperature}, margin={self.margin}, "
            f"num_negatives={self.num_negatives}, max_positives={self.max_positives}, "
            f"min_bank_size={self.min_bank_size}, index={self.index!r}, "
            + super().extra_repr()
        )
