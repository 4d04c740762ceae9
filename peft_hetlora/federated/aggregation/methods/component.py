"""``component`` / ``component_data``: the general component rule of docs/design.md#component-rule for
component-indexed uploads.

Component ``j`` of the new global is the weighted average of component ``j`` over the clients whose index set
``I_k`` contains ``j``; components no client trained keep their previous global value. With prefix index sets this
is RBLA (arXiv 2408.08699, ``rankwise``); with rotating windows it is the server side of FedRolex (arXiv 2212.01548)
and HeteroFL (arXiv 2010.01264) applied to LoRA components, and of Fed-PLoRA's select-and-fold clients
(arXiv 2602.16936). ``component_fedavg`` is the same placement with FedAvg's step: every sampled client votes on
every component, one that did not train it votes for its previous value.
"""

from __future__ import annotations

from typing import ClassVar

from .base import AggregationMethod, PaddedSum

__all__ = ["ComponentFedAvg", "ComponentRule", "ComponentRuleData"]


class ComponentRule(AggregationMethod):
    """Per-component weighted average over the clients that trained the component, sparsity weights ``S_k``.

    ``A[j] = sum_{k: j in I_k} p_k A_k[slot_k(j)] / sum_{k: j in I_k} p_k`` (and ``B[:, j]`` alike), ``p_k = S_k =
    ||s B_k A_k||_F`` of the client's uploaded components; untrained components keep ``previous`` (zeros without
    one). A client's ``I_k`` is ``ClientUpdate.components`` (``range(r_k)`` when ``None``). Credits: RBLA
    (arXiv 2408.08699) for the prefix case; FedRolex (arXiv 2212.01548), HeteroFL (arXiv 2010.01264) and Fed-PLoRA
    (arXiv 2602.16936) for training a selected subset.

    Example:
        >>> ComponentRule().accepts_components, ComponentRule().weights
        (True, 'sparsity')
    """

    name: ClassVar[str] = "component"
    weights: ClassVar[str] = "sparsity"
    uses_previous: ClassVar[bool] = True
    accepts_components: ClassVar[bool] = True

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> PaddedSum:
        return PaddedSum(a_shape, b_shape, r_max, covered_only=True)


class ComponentRuleData(ComponentRule):
    """The general component rule with data-size weights ``n_k`` (capped like every data-weighted method).

    Example:
        >>> ComponentRuleData().weights
        'data'
    """

    name: ClassVar[str] = "component_data"
    weights: ClassVar[str] = "data"


class ComponentFedAvg(AggregationMethod):
    """FedAvg of the round's updates on component-indexed uploads: a client that did not train a component counts
    as having left it unchanged.

    ``A[j] = (sum_{k: j in I_k} p_k A_k[slot_k(j)] + sum_{k: j not in I_k} p_k A_prev[j]) / sum_k p_k`` (and
    ``B[:, j]`` alike), ``p_k = n_k`` (capped like every data-weighted method); the sum runs over every client of the
    round. Equivalently ``A[j] = A_prev[j] + (P_j / P) (avg_j - A_prev[j])`` where ``avg_j`` is the ``component``
    rule's value, ``P_j`` the weight of the clients that trained ``j`` and ``P`` the round's: a component moves by
    the round's mean update, as in FedAvg (arXiv 1602.05629), not by the mean over its few trainers.

    Why: clients that train disjoint windows each fit the whole local loss in their own components, so under the
    ``component`` rule their corrections add up (the round's step grows with the number of disjoint windows, and
    the window arms diverge at learning rates the prefix arms take). It is ``zero_pad`` with the previous global as
    the padding: HetLoRA's zero-padding (arXiv 2401.06432) erases the components weak clients do not hold, padding
    with their previous value keeps them. Without a previous global it is ``zero_pad``. Credits as for
    :class:`ComponentRule`: FedRolex (arXiv 2212.01548) and HeteroFL (arXiv 2010.01264) for training rotating
    sub-models.

    Example:
        >>> ComponentFedAvg().weights, ComponentFedAvg().accepts_components
        ('data', True)
    """

    name: ClassVar[str] = "component_fedavg"
    weights: ClassVar[str] = "data"
    uses_previous: ClassVar[bool] = True
    accepts_components: ClassVar[bool] = True

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> PaddedSum:
        return PaddedSum(a_shape, b_shape, r_max, covered_only=False, pad_previous=True)
