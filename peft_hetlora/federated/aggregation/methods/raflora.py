"""``raflora``: contributor-normalised product sum per component, then FlexLoRA's SVD (Wu et al., arXiv 2602.13486)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ...adapter import flat_a, flat_b
from .base import NONE
from .flexlora import FactorStack, FlexLoRA

__all__ = ["ContributorStack", "RaFLoRA"]


class RaFLoRA(FlexLoRA):
    """Each global component is averaged in product space over the clients that trained it, then the top ``r_max``
    singular triplets of the sum become the global, as in FlexLoRA.

    ``W = sum_j (sum_{k in C_j} w_k b_kj a_kj^T) / (sum_{k in C_j} w_k)``, plus ``b_prev_j a_prev_j^T`` for every
    component ``j`` no client trained (``C_j`` empty), then ``B = U S``, ``A = V^T`` of its top ``r_max`` triplets
    (``b_kj`` / ``a_kj``: column / row of client ``k``'s upload that holds global component ``j``, its window or
    ``0 .. r_k-1``; ``C_j``: the clients whose upload holds ``j``; ``w_k = n_k``, capped like every data-weighted
    method).

    From raFLoRA, Wu, Hu, Min and Wang, "Preventing Rank Collapse in Federated Low-Rank Adaptation with Client
    Heterogeneity", arXiv 2602.13486: under FlexLoRA's data-size weights (arXiv 2402.11505) a component only the
    rank-``r_max`` clients train is divided by the weight of every client, so it shrinks by their share each round
    and the global's energy collapses onto the smallest shared rank; raFLoRA splits each client's update into rank
    partitions and averages each partition over the clients that contribute to it (implemented from the paper's
    abstract and summaries; its method section was not available, docs/aggregation.md). Differences, named: a
    partition here is one component, the same rule for prefix uploads as blocks between consecutive client ranks
    (every component of such a block has the same contributors), which extends it to component-indexed (window)
    uploads; weights are capped data sizes; a component nobody trained keeps the previous global's value. ``svd``
    as in :class:`~.flexlora.FlexLoRA`, through its :class:`~.flexlora.FactorStack`.

    Memory: every client's factors are held until :meth:`ContributorStack.result` (the per-component denominators
    are known only then), ``sum_k r_k (d_out + d_in)`` float32 values per module, what FlexLoRA's stack holds below
    its recompression limit.

    Example:
        >>> import torch
        >>> from peft_hetlora.federated.aggregation import ClientUpdate, aggregate
        >>> def up(cid, rank, value):
        ...     return ClientUpdate(cid, {"m.lora_A.weight": torch.eye(rank, 2),
        ...                               "m.lora_B.weight": value * torch.eye(2, rank)}, rank=rank, num_examples=1)
        >>> res = aggregate([up("weak", 1, 1.0), up("strong", 2, 3.0)], method="raflora", r_max=2, scaling=1.0)
        >>> w = res.state_dict["m.lora_B.weight"] @ res.state_dict["m.lora_A.weight"]
        >>> [round(float(v), 4) for v in w.diagonal()]  # component 0: mean(1, 3); component 1: only "strong"'s 3
        [2.0, 3.0]
    """

    name: ClassVar[str] = "raflora"
    uses_previous: ClassVar[bool] = True
    accepts_components: ClassVar[bool] = True

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> ContributorStack:
        return ContributorStack(a_shape, b_shape, r_max, svd=self.svd, oversample=self.oversample,
                                power_iters=self.power_iters, seed=self.seed)


class ContributorStack:
    """raFLoRA's state for one module: every client's factors, their global component indices and weights.

    ``den[j]`` is the weight of the clients that uploaded component ``j``; :meth:`result` scales each uploaded
    column ``b_kj`` by ``w_k / den[j]``, stacks the previous global's components nobody trained, and takes the top
    ``r_max`` SVD of the stacked product through a :class:`~.flexlora.FactorStack` at weight 1.

    Example:
        >>> import torch
        >>> acc = ContributorStack((2, 3), (3, 2), 2)
        >>> acc.add("c", torch.ones(1, 3), torch.ones(3, 1), level=1, weight=5.0)
        >>> acc.den.tolist()
        [5.0, 0.0]
    """

    def __init__(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int, *, svd: str = "auto",
                 oversample: int = 16, power_iters: int = 2, seed: int = 0) -> None:
        self.a_shape, self.b_shape, self.r_max = a_shape, b_shape, r_max
        self.svd, self.oversample, self.power_iters, self.seed = svd, oversample, power_iters, seed
        self.level = NONE
        self.den = np.zeros(r_max, dtype=np.float64)
        # per client: (A rows float32 (r_k, d_in), B columns float32 (d_out, r_k), weight, global indices)
        self.entries: list[tuple[torch.Tensor, torch.Tensor, float, np.ndarray]] = []

    def add(self, client_id: str, a: torch.Tensor, b: torch.Tensor, level: int, weight: float,
            components: tuple[int, ...] | None = None) -> None:
        if level < self.level:
            return
        if level > self.level:  # a better weighting level: every earlier client had weight 0 at it
            self.entries, self.level = [], level
            self.den[:] = 0.0
        rank = a.shape[0]
        own = np.arange(rank) if components is None else np.asarray(components[:rank], dtype=np.int64)
        self.den[own] += weight
        self.entries.append((flat_a(a).to(torch.float32, copy=True), flat_b("", b).to(torch.float32, copy=True),
                             float(weight), own))

    def _stacked(self, previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 ``(B_cat, A_cat)`` of the contributor-normalised sum (and the previous global's untrained
        components)."""
        a_blocks, b_blocks = [], []
        for a, b, weight, own in self.entries:
            scale = torch.from_numpy(weight / self.den[own])  # <= 1: the scaled columns stay within float32
            a_blocks.append(a.to(torch.float64))
            b_blocks.append(b.to(torch.float64) * scale)
        idle = np.nonzero(self.den == 0.0)[0]
        if previous is not None and idle.size:
            prev_a, prev_b = previous
            rows = torch.from_numpy(idle)
            a_blocks.append(flat_a(prev_a).to(torch.float64)[rows])
            b_blocks.append(flat_b("", prev_b).to(torch.float64)[:, rows])
        return torch.cat(b_blocks, dim=1), torch.cat(a_blocks, dim=0)

    def result(self, previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.entries:  # nothing at any level: the previous global stands (zeros without one)
            if previous is not None:
                return previous[0].to(torch.float32).clone(), previous[1].to(torch.float32).clone()
            return (torch.zeros((self.r_max, *self.a_shape[1:]), dtype=torch.float32),
                    torch.zeros((self.b_shape[0], self.r_max, *self.b_shape[2:]), dtype=torch.float32))
        b_cat, a_cat = self._stacked(previous)
        stack = FactorStack("", self.a_shape, self.b_shape, self.r_max, svd=self.svd, oversample=self.oversample,
                            power_iters=self.power_iters, seed=self.seed)
        # one entry at weight 1: FactorStack divides by the sum of its weights, and the normalisation is done
        stack.add("raflora", a_cat.to(torch.float32), b_cat.to(torch.float32), level=max(self.level, 0), weight=1.0)
        return stack.result(None)

    def describe(self) -> dict[str, object]:
        """The components each client uploaded in total and the components nobody trained (``summary.json``).

        Example:
            >>> ContributorStack((2, 3), (3, 2), 2).describe()
            {'path': 'contributor', 'components': 0, 'untrained': [0, 1]}
        """
        return {"path": "contributor", "components": int(sum(e[3].size for e in self.entries)),
                "untrained": np.nonzero(self.den == 0.0)[0].tolist()}

    def level_used(self) -> int | None:
        return None if self.level == NONE else self.level

    def clone(self) -> ContributorStack:
        copy = ContributorStack(self.a_shape, self.b_shape, self.r_max, svd=self.svd, oversample=self.oversample,
                                power_iters=self.power_iters, seed=self.seed)
        copy.level, copy.den, copy.entries = self.level, self.den.copy(), list(self.entries)
        return copy
