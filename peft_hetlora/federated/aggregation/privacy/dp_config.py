"""Client-level DP settings (`DPConfig`) and the privacy accounting of a run (`privacy_spent`, via Opacus).

DP-FedAvg (McMahan et al., arXiv 1710.06963) adapted to components; the mechanism itself lives in
[`privacy`][peft_hetlora.federated.aggregation.privacy.dp], which re-exports everything here.

Example:
    ```py
    >>> cfg = DPConfig(clip=1.0, noise_multiplier=1.1, sampling_rate=0.1, population=100)  # doctest: +SKIP
    >>> privacy_spent(cfg, rounds=20)["epsilon"]  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ....utils.errors import HetLoRAError

__all__ = ["DPConfig", "DPConfigError", "dp_config_from_dict", "positive_setting", "privacy_spent"]


class DPConfigError(HetLoRAError, ValueError):
    """An invalid differential-privacy setting; the message says which value to change."""


def positive_setting(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float when it is a finite number ``> 0`` (``>= 0`` with ``allow_zero``); else `DPConfigError`.

    Example:
        >>> positive_setting("clip", 2), positive_setting("noise_multiplier", 0, allow_zero=True)
        (2.0, 0.0)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DPConfigError(f"DPConfig.{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise DPConfigError(f"DPConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPConfig:
    """Settings of client-level DP; resolved and validated on construction.

    Args:
        clip: L2 bound ``C`` on one client's contribution (all its components and extras together).
        noise_multiplier: ``sigma``; the noise std is ``sigma * C`` per coordinate. Give this or ``target_epsilon``.
        target_epsilon: the ``epsilon`` to reach after ``rounds`` rounds; ``sigma`` is then found by Opacus's
            ``get_noise_multiplier`` for this accountant, sampling rate and delta.
        rounds: the planned number of DP rounds (needed with ``target_epsilon``).
        sampling_rate: ``q``, the probability that a client takes part in a round (Poisson sampling assumed by the
            accountant's amplification; ``1.0`` when every client takes part).
        population: ``N``, the number of clients in the federation; default ``delta = 1 / N**1.1`` and default
            ``expected_clients = q * N``.
        delta: the ``delta`` of ``(epsilon, delta)``; default ``1 / N**1.1``.
        expected_clients: the public denominator ``q * N`` (expected weight sum of a round).
        expected_coverage: per component ``j < r_max``, the public expected fraction of clients that train it
            (from the rank policy; e.g. ranks uniform in ``[1, 8]`` give ``(1, 7/8, ..., 1/8)``); the component rule
            divides component ``j`` by ``expected_clients * coverage_j``. Default all ``1``.
        model: ``"central"`` (the aggregator is trusted and adds the noise) or ``"local"`` (each client adds it).
        accountant: ``"rdp"`` (Opacus ``RDPAccountant``, default) or ``"prv"`` (``PRVAccountant``).

    Example:
        >>> cfg = DPConfig(clip=1.0, noise_multiplier=1.1, sampling_rate=0.1, population=100)
        >>> round(cfg.delta, 8), cfg.expected_clients
        (0.00630957, 10.0)
    """

    clip: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    rounds: int | None = None
    sampling_rate: float = 1.0
    population: int | None = None
    delta: float | None = None
    expected_clients: float | None = None
    expected_coverage: tuple[float, ...] | None = None
    model: str = "central"
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        positive_setting("clip", self.clip)
        if self.model not in ("central", "local"):
            raise DPConfigError(f"DPConfig.model must be 'central' or 'local', got {self.model!r}")
        if self.accountant not in ("rdp", "prv"):
            raise DPConfigError(f"DPConfig.accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        q = positive_setting("sampling_rate", self.sampling_rate)
        if q > 1:
            raise DPConfigError(f"DPConfig.sampling_rate is a probability in (0, 1], got {q}")
        if self.population is not None and (
            isinstance(self.population, bool) or not isinstance(self.population, int) or self.population < 1
        ):
            raise DPConfigError(f"DPConfig.population must be an int >= 1, got {self.population!r}")
        if self.rounds is not None and (
            isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1
        ):
            raise DPConfigError(f"DPConfig.rounds must be an int >= 1, got {self.rounds!r}")
        delta = self.delta
        if delta is None:
            if self.population is None:
                raise DPConfigError("DPConfig needs delta=... or population=N (then delta = 1 / N**1.1)")
            delta = 1.0 / self.population**1.1
        if not 0 < positive_setting("delta", delta) < 1:
            raise DPConfigError(f"DPConfig.delta must be in (0, 1), got {delta}")
        object.__setattr__(self, "delta", float(delta))
        if self.expected_clients is None and self.population is not None:
            object.__setattr__(self, "expected_clients", q * self.population)
        if self.expected_clients is not None:
            object.__setattr__(self, "expected_clients", positive_setting("expected_clients", self.expected_clients))
        if self.expected_coverage is not None:
            cov = tuple(float(c) for c in self.expected_coverage)
            if any(not 0.0 <= c <= 1.0 for c in cov):
                raise DPConfigError(f"DPConfig.expected_coverage holds fractions in [0, 1], got {cov}")
            object.__setattr__(self, "expected_coverage", cov)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise DPConfigError("DPConfig needs exactly one of noise_multiplier=... or target_epsilon=...")
        if self.noise_multiplier is not None:
            object.__setattr__(
                self, "noise_multiplier", positive_setting("noise_multiplier", self.noise_multiplier, allow_zero=True)
            )
            return
        positive_setting("target_epsilon", self.target_epsilon)
        if self.rounds is None:
            raise DPConfigError("DPConfig(target_epsilon=...) needs rounds=... (the planned number of DP rounds)")
        get_noise_multiplier = _opacus().accountants.utils.get_noise_multiplier
        sigma = get_noise_multiplier(
            target_epsilon=float(self.target_epsilon),
            target_delta=float(delta),
            sample_rate=self._accounted_rate(),
            steps=self.rounds,
            accountant=self.accountant,
        )
        object.__setattr__(self, "noise_multiplier", float(sigma) * self._sensitivity_factor())

    def _accounted_rate(self) -> float:
        # Local DP: the server sees every upload, so there is no amplification by sampling.
        return 1.0 if self.model == "local" else float(self.sampling_rate)

    def _sensitivity_factor(self) -> float:
        # Local DP: replace-one neighbours are up to 2C apart, so the effective multiplier is sigma / 2.
        return 2.0 if self.model == "local" else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (for a federation's config and the model card)."""
        return {
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "rounds": self.rounds,
            "sampling_rate": self.sampling_rate,
            "population": self.population,
            "delta": self.delta,
            "expected_clients": self.expected_clients,
            "expected_coverage": None if self.expected_coverage is None else list(self.expected_coverage),
            "model": self.model,
            "accountant": self.accountant,
        }


def dp_config_from_dict(data: Mapping[str, Any]) -> DPConfig:
    """Rebuild a `DPConfig` from `DPConfig.to_dict` (a federation.json record) without re-solving for sigma.

    The resolved ``noise_multiplier`` is kept; ``target_epsilon`` is dropped (it was only the way to find sigma).

    Example:
        >>> cfg = DPConfig(clip=1.0, noise_multiplier=1.1, delta=1e-5, expected_clients=4)
        >>> dp_config_from_dict(cfg.to_dict()) == cfg
        True
    """
    known = {"clip", "noise_multiplier", "rounds", "sampling_rate", "population", "delta", "expected_clients",
             "expected_coverage", "model", "accountant"}
    values = {k: v for k, v in data.items() if k in known}
    if values.get("expected_coverage") is not None:
        values["expected_coverage"] = tuple(values["expected_coverage"])
    return DPConfig(**values)


def _opacus() -> Any:
    try:
        import opacus
        import opacus.accountants.utils  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DPConfigError(
            "differential-privacy accounting needs Opacus: pip install 'peft-hetlora[privacy]' (opacus==1.6.0)"
        ) from err
    return opacus


def privacy_spent(config: DPConfig, rounds: int) -> dict[str, Any]:
    """The ``(epsilon, delta)`` spent after ``rounds`` DP rounds, from Opacus's accountant; JSON-ready.

    ``epsilon`` is ``None`` when the noise multiplier is 0 (no privacy) and ``0.0`` for zero rounds.

    Example:
        >>> rec = privacy_spent(DPConfig(clip=1.0, noise_multiplier=1.5, sampling_rate=0.04, delta=1e-5), 2250)
        >>> round(rec["epsilon"], 4), rec["accountant"]
        (7.3291, 'rdp')
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise DPConfigError(f"rounds must be an int >= 0, got {rounds!r}")
    opacus = _opacus()
    sigma = float(config.noise_multiplier) / config._sensitivity_factor()  # type: ignore[arg-type]
    rate = config._accounted_rate()
    if rounds == 0:
        epsilon: float | None = 0.0
    elif sigma == 0.0:
        epsilon = None
    else:
        from opacus.accountants import PRVAccountant, RDPAccountant

        accountant = RDPAccountant() if config.accountant == "rdp" else PRVAccountant()
        for _ in range(rounds):  # Opacus merges identical consecutive steps into one history entry
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
        epsilon = float(accountant.get_epsilon(delta=float(config.delta)))  # type: ignore[arg-type]
    return {
        "epsilon": epsilon,
        "delta": config.delta,
        "rounds": rounds,
        "noise_multiplier": config.noise_multiplier,
        "clip": config.clip,
        "sampling_rate": rate,
        "model": config.model,
        "accountant": config.accountant,
        "library": f"opacus {opacus.__version__}",
        "adjacency": "replace-one client (local)" if config.model == "local" else "add/remove one client",
    }
