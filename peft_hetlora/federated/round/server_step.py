"""The server step: a server optimizer on the product and error feedback on the truncation back to ``r_max``.

After any aggregation method has produced the round's aggregate, one server step turns it into the new global, per
LoRA module, in product space (``W = s B A``; docs/aggregation.md#server-step):

* the pseudo-gradient ``Delta_t = W_agg,t - W_{t-1}``, where ``W_agg`` is the method's aggregate: for the FlexLoRA
  family the *untruncated* weighted sum of the (held) client products, for every other method its result;
* ``fedavgm`` (FedAvgM, Hsu, Qi and Brown, arXiv 1909.06335, as a server optimizer in Reddi et al., "Adaptive
  Federated Optimization", arXiv 2003.00295): ``m_t = beta m_{t-1} + Delta_t``, step ``eta m_t``;
* ``fedadam`` (FedAdam, Reddi et al., arXiv 2003.00295) with Adafactor's factored second moment (Shazeer and Stern,
  "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", arXiv 1804.04235): ``m_t = beta1 m_{t-1} +
  (1 - beta1) Delta_t``; row and column sums of ``Delta_t^2`` (from the factors: the row sums of ``(B A)^2`` are
  ``diag(B (A A^T) B^T)``) in exponential averages ``v_row``, ``v_col``; ``v_hat = v_row v_col^T / sum(v_row)``; the
  step ``eta diag(1 / (a + sqrt(tau))) m_t diag(1 / (b + sqrt(tau)))`` with ``a = sqrt(v_row) / S^(1/4)``,
  ``b = sqrt(v_col) / S^(1/4)``, ``S = sum(v_row)`` (``a_i b_j = sqrt(v_hat_ij)``), which stays low rank;
* ``W_pre = W_{t-1} + step`` (without an optimizer, ``W_pre = W_agg``), plus with error feedback the residual
  ``e_{t-1}`` carried from the last round; ``W_t = trunc_{r_max}(W_pre)`` by the SVD FlexLoRA uses (``B = U S / s``,
  ``A = V^T``) and ``e_t = W_pre - W_t``, kept at its top ``r_max`` singular triplets (the server's state; zero extra
  communication). Error feedback as ECLoRA intends it (Ning et al., "Federated Fine-Tuning on Heterogeneous LoRAs
  With Error-Compensated Aggregation", IEEE TNNLS 2025, doi 10.1109/TNNLS.2025.3586545), with the SVD applied to
  the *compensated* sum ``W_pre + e_{t-1}`` (their code decomposes the uncompensated one).

Each round steps with the exact momentum ``m_t`` (its factors stacked, never truncated before the step); the
momentum carried to the next round is kept as low-rank factors truncated to ``rank`` (default ``2 r_max``) singular
triplets: the dropped part is at most ``sigma_{rank+1}(m_t)`` in spectral norm (exact whenever ``m_t`` has rank
``<= rank``). So ``fedavgm`` with ``momentum=0, lr=1`` is the method's own aggregate. Nothing here forms a dense
``d_out x d_in`` matrix. Dense extras (``modules_to_save``) keep the method's aggregate. The step is
post-processing of the aggregate: a DP round's guarantee holds unchanged.

Example:
    ```py
    >>> parse_server_optimizer({"name": "fedavgm", "lr": 1.0, "momentum": 0.9})
    ServerOptimizer(name='fedavgm', lr=1.0, momentum=0.9, beta1=0.9, beta2=0.99, tau=0.001, rank=None)
    >>> parse_server_optimizer("fedadam:lr=0.01,tau=1e-4").to_dict()
    {'name': 'fedadam', 'lr': 0.01, 'beta1': 0.9, 'beta2': 0.99, 'tau': 0.0001}
    >>> parse_server_optimizer(None) is None
    True
    ```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...utils.errors import AggregationError
from ..adapter import flat_a, flat_b, is_int, is_real, split_lora_keys

__all__ = [
    "SERVER_OPTIMIZERS",
    "ServerOptimizer",
    "ServerStep",
    "low_rank_svd",
    "parse_server_optimizer",
]

#: The server optimizers and the hyper-parameters each one takes, with their defaults (the one source of both).
#: ``fedavgm``'s ``lr=1, momentum=0`` is the method's own aggregate (up to the re-factoring SVD); FedAdam's defaults
#: are Reddi et al.'s (``beta1=0.9``, ``beta2=0.99``, ``tau=1e-3``) with a server rate of ``1e-2``.
SERVER_OPTIMIZERS: dict[str, dict[str, float]] = {
    "fedavgm": {"lr": 1.0, "momentum": 0.9},
    "fedadam": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}


@dataclass(frozen=True)
class ServerOptimizer:
    """A validated server optimizer (build it with `parse_server_optimizer`).

    Args:
        name: ``"fedavgm"`` or ``"fedadam"`` (`SERVER_OPTIMIZERS`).
        lr: the server rate ``eta`` (finite, > 0).
        momentum: FedAvgM's ``beta`` in ``[0, 1)``.
        beta1, beta2: FedAdam's moment decays in ``[0, 1)``; tau: its adaptivity ``tau`` (finite, > 0).
        rank: the rank the momentum is kept at (None: ``2 r_max``).

    Example:
        ```py
        >>> ServerOptimizer("fedavgm", lr=0.5).momentum_rank(8)
        16
        ```
    """

    name: str
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    rank: int | None = None

    def momentum_rank(self, r_max: int) -> int:
        """The rank the momentum factors are truncated to."""
        return 2 * r_max if self.rank is None else self.rank

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``federation.json``, ``round.json``): the name and this optimizer's own parameters."""
        out: dict[str, Any] = {"name": self.name}
        out.update({key: getattr(self, key) for key in SERVER_OPTIMIZERS[self.name]})
        if self.rank is not None:
            out["rank"] = self.rank
        return out


def _parse_text(text: str) -> dict[str, Any]:
    """``"fedadam:lr=0.01,tau=1e-4"`` -> ``{"name": "fedadam", "lr": 0.01, "tau": 1e-4}``."""
    name, _, rest = text.partition(":")
    out: dict[str, Any] = {"name": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise AggregationError(f"server_optimizer: {part!r} is not key=value (e.g. 'fedavgm:lr=1,momentum=0.9')")
        try:
            out[key.strip()] = int(value) if key.strip() == "rank" else float(value)
        except ValueError:
            raise AggregationError(f"server_optimizer: {key.strip()}={value!r} is not a number") from None
    return out


def parse_server_optimizer(value: Any) -> ServerOptimizer | None:
    """A server optimizer from its dict form, a ``"name:key=value,..."`` string or a `ServerOptimizer`; None: off.

    Raises:
        AggregationError: an unknown optimizer or parameter, or a value out of range (with what to give instead).

    Example:
        ```py
        >>> parse_server_optimizer({"name": "fedavgm"}).momentum
        0.9
        >>> parse_server_optimizer({"name": "fedavgm", "lr": float("nan")})
        Traceback (most recent call last):
        ...
        peft_hetlora.utils.errors.AggregationError: server_optimizer: lr must be a finite number > 0, got nan
        ```
    """
    if value is None or isinstance(value, ServerOptimizer):
        return value
    if isinstance(value, str):
        value = _parse_text(value)
    if not isinstance(value, Mapping):
        raise AggregationError(f"server_optimizer must be None, a dict such as {{'name': 'fedavgm', 'lr': 1.0}} or "
                               f"a string such as 'fedavgm:lr=1,momentum=0.9'; got {type(value).__name__}")
    name = value.get("name")
    if name not in SERVER_OPTIMIZERS:
        raise AggregationError(f"server_optimizer: name must be one of {list(SERVER_OPTIMIZERS)}, got {name!r}")
    allowed = SERVER_OPTIMIZERS[name]
    unknown = sorted(str(k) for k in value if k not in allowed and k not in ("name", "rank"))
    if unknown:
        raise AggregationError(f"server_optimizer {name!r}: unknown parameter(s) {unknown}; it takes "
                               f"{sorted(allowed)} (and 'rank' of the momentum)")
    params: dict[str, Any] = {}
    for key, default in allowed.items():
        given = value.get(key, default)
        if not is_real(given) or not math.isfinite(given):
            raise AggregationError(f"server_optimizer: {key} must be a finite number {_RANGES[key][1]}, got {given!r}")
        if not _RANGES[key][0](float(given)):
            raise AggregationError(f"server_optimizer: {key} must be {_RANGES[key][1]}, got {given!r}")
        params[key] = float(given)
    rank = value.get("rank")
    if rank is not None and (not is_int(rank) or rank < 1):
        raise AggregationError(f"server_optimizer: rank (of the momentum) must be an int >= 1 or None, got {rank!r}")
    return ServerOptimizer(name=name, rank=None if rank is None else int(rank), **params)


_MOMENTS = (".v_row", ".v_col")

_RANGES = {
    "lr": (lambda x: x > 0, "> 0"),
    "tau": (lambda x: x > 0, "> 0"),
    "momentum": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "beta1": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "beta2": (lambda x: 0 <= x < 1, "in [0, 1)"),
}


def low_rank_svd(b: torch.Tensor, a: torch.Tensor, keep: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V^T)`` of ``b @ a`` (top ``keep`` triplets, all if None) from two QRs and a small SVD, float64.

    The product is never formed: ``b = Q_b R_b``, ``a^T = Q_a R_a``, ``b a = Q_b (R_b R_a^T) Q_a^T``.

    Example:
        ```py
        >>> b, a = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        >>> u, s, vh = low_rank_svd(b, a)
        >>> bool(torch.allclose((u * s) @ vh, b @ a)), tuple(s.shape)
        (True, (2,))
        ```
    """
    b, a = b.to(torch.float64), a.to(torch.float64)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = s.shape[0] if keep is None else min(keep, s.shape[0])
    return q_b @ u[:, :k], s[:k], vh[:k] @ q_a.T


def _truncate(b: torch.Tensor, a: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``keep`` factors ``(U S, V^T)`` of ``b @ a``."""
    u, s, vh = low_rank_svd(b, a, keep)
    return u * s, vh


def _row_col_sq(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of ``(b a)^2`` from the factors: ``diag(b (a a^T) b^T)`` and ``diag(a^T (b^T b) a)``."""
    rows = ((b @ (a @ a.T)) * b).sum(dim=1)
    cols = ((a.T @ (b.T @ b)) * a.T).sum(dim=1)
    return rows.clamp_min(0.0), cols.clamp_min(0.0)


@dataclass(frozen=True)
class ServerStep:
    """One server step per round (see the module docstring): the optimizer, error feedback and the ranks.

    Args:
        optimizer: a `ServerOptimizer` or None (the method's aggregate is the step's target).
        error_feedback: carry the truncation's residual to the next round.
        r_max: the global's rank; scaling: ``s`` of ``W = s B A``.

    Example:
        ```py
        >>> import torch
        >>> prev = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(3, 2)}
        >>> agg = {"m.lora_A.weight": torch.ones(2, 4), "m.lora_B.weight": torch.ones(3, 2)}
        >>> step = ServerStep(parse_server_optimizer({"name": "fedavgm", "lr": 1.0, "momentum": 0.0}), False, 2, 1.0)
        >>> new, state, info = step.apply(prev, agg, {}, None)
        >>> bool(torch.allclose(new["m.lora_B.weight"] @ new["m.lora_A.weight"], torch.full((3, 4), 2.0)))
        True
        ```
    """

    optimizer: ServerOptimizer | None
    error_feedback: bool
    r_max: int
    scaling: float

    @property
    def active(self) -> bool:
        """Whether the step changes anything (off: the method's aggregate is published as it was)."""
        return self.optimizer is not None or self.error_feedback

    def apply(self, previous: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor],
              products: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
              state: Mapping[str, torch.Tensor] | None,
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """The new global, the new server state and a JSON record of the step.

        Args:
            previous: the global the clients were sent (every module at ``r_max``).
            aggregate: the method's result (its factors are ``W_agg`` where ``products`` has no entry).
            products: ``A key -> (B, A)`` untruncated factors of ``W_agg / s`` (the FlexLoRA family), any rank.
            state: the server state of the last round (None or empty: zero momentum, moments and residual).
        """
        modules, _ = split_lora_keys(aggregate)
        state = dict(state or {})
        out = dict(aggregate)
        new_state: dict[str, torch.Tensor] = {}
        step_sq = residual_sq = 0.0
        for name, (a_key, b_key) in modules.items():
            new_a, new_b, module_state, norms = self._module(name, previous, aggregate, products.get(a_key),
                                                              state, a_key, b_key)
            out[a_key], out[b_key] = new_a, new_b
            new_state.update(module_state)
            step_sq += norms[0]
            residual_sq += norms[1]
        # factors kept in float32 (half the bytes beside each global; the second moments, d_out + d_in numbers a
        # module of squared magnitudes, stay float64); the next round reads exactly what was stored, so a
        # coordinator that restarts from the store and one that keeps the state in memory compute the same
        new_state = {k: (v if k.endswith(_MOMENTS) else v.to(torch.float32)).contiguous()
                     for k, v in new_state.items()}
        info: dict[str, Any] = {"optimizer": None if self.optimizer is None else self.optimizer.to_dict(),
                                "error_feedback": self.error_feedback}
        if self.optimizer is not None:
            info["step_norm"] = math.sqrt(step_sq)  # ||eta * step(Delta)||_F over all modules
        if self.error_feedback:
            info["residual_norm"] = math.sqrt(residual_sq)
        return out, new_state, info

    def _module(self, name, previous, aggregate, product, state, a_key, b_key):
        s = self.scaling
        a_shape, b_shape = tuple(aggregate[a_key].shape), tuple(aggregate[b_key].shape)
        prev_a = flat_a(previous[a_key]).to(torch.float64)
        prev_b = flat_b(name, previous[b_key]).to(torch.float64) * s
        if product is None:
            agg_b = flat_b(name, aggregate[b_key]).to(torch.float64) * s
            agg_a = flat_a(aggregate[a_key]).to(torch.float64)
        else:
            agg_b, agg_a = product[0].to(torch.float64) * s, product[1].to(torch.float64)
        new_state: dict[str, torch.Tensor] = {}
        opt = self.optimizer
        step_sq = 0.0
        if opt is None:
            pre_b, pre_a = agg_b, agg_a
        else:
            delta_b, delta_a = torch.cat([agg_b, -prev_b], dim=1), torch.cat([agg_a, prev_a], dim=0)
            m_b, m_a = state.get(f"{name}.m_B"), state.get(f"{name}.m_A")
            decay, gain = (opt.momentum, 1.0) if opt.name == "fedavgm" else (opt.beta1, 1.0 - opt.beta1)
            if m_b is not None and m_a is not None and m_b.shape[1]:
                sum_b = torch.cat([m_b.to(torch.float64) * decay, delta_b * gain], dim=1)
                sum_a = torch.cat([m_a.to(torch.float64), delta_a], dim=0)
            else:
                sum_b, sum_a = delta_b * gain, delta_a
            # this round steps with the exact momentum; the next one gets it truncated to momentum_rank
            kept_b, kept_a = _truncate(sum_b, sum_a, opt.momentum_rank(self.r_max))
            new_state[f"{name}.m_B"], new_state[f"{name}.m_A"] = kept_b.contiguous(), kept_a.contiguous()
            step_b, step_a = sum_b * opt.lr, sum_a
            if opt.name == "fedadam":
                rows, cols = _row_col_sq(delta_b, delta_a)
                v_row, v_col = state.get(f"{name}.v_row"), state.get(f"{name}.v_col")
                v_row = rows * (1 - opt.beta2) if v_row is None else v_row.to(torch.float64) * opt.beta2 + rows * (
                    1 - opt.beta2)
                v_col = cols * (1 - opt.beta2) if v_col is None else v_col.to(torch.float64) * opt.beta2 + cols * (
                    1 - opt.beta2)
                new_state[f"{name}.v_row"], new_state[f"{name}.v_col"] = v_row, v_col
                total = float(v_row.sum())
                quarter = total ** 0.25 if total > 0 else 1.0
                root_tau = math.sqrt(opt.tau)
                step_b = step_b / (v_row.sqrt() / quarter + root_tau).unsqueeze(1)
                step_a = step_a / (v_col.sqrt() / quarter + root_tau).unsqueeze(0)
            step_sq = float(((step_b.T @ step_b) * (step_a @ step_a.T)).sum())
            pre_b, pre_a = torch.cat([prev_b, step_b], dim=1), torch.cat([prev_a, step_a], dim=0)
        if self.error_feedback:
            e_b, e_a = state.get(f"{name}.e_B"), state.get(f"{name}.e_A")
            if e_b is not None and e_a is not None and e_b.shape[1]:
                pre_b = torch.cat([pre_b, e_b.to(torch.float64)], dim=1)
                pre_a = torch.cat([pre_a, e_a.to(torch.float64)], dim=0)
        u, sig, vh = low_rank_svd(pre_b, pre_a, 2 * self.r_max if self.error_feedback else self.r_max)
        k = min(self.r_max, sig.shape[0])
        residual_sq = 0.0
        if self.error_feedback:
            e_b, e_a = u[:, k:] * sig[k:], vh[k:]
            new_state[f"{name}.e_B"], new_state[f"{name}.e_A"] = e_b.contiguous(), e_a.contiguous()
            residual_sq = float((sig[k:] ** 2).sum())
        new_a = torch.zeros((self.r_max, prev_a.shape[1]), dtype=torch.float32)
        new_b = torch.zeros((prev_b.shape[0], self.r_max), dtype=torch.float32)
        new_a[:k] = vh[:k].to(torch.float32)
        new_b[:, :k] = (u[:, :k] * (sig[:k] / s)).to(torch.float32)
        new_a = new_a.reshape(self.r_max, *a_shape[1:])
        new_b = new_b.reshape(b_shape[0], self.r_max, *b_shape[2:])
        return new_a, new_b, new_state, (step_sq, residual_sq)
