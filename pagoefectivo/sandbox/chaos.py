"""Gateway faults on demand (docs/PROTOCOL.md lists them), so the refund path is tested against a bad day.

``ChaosConfig`` is the set of knobs (the same names as ``POST /sandbox/chaos`` keys and, in
kebab case, as ``sandbox serve`` flags); ``Chaos`` makes the random decisions from it.
Defaults are no faults at all, and a knob at zero costs nothing (no sleep, no random draw).
Rates and weights are probabilities, not money, so they are floats; anything else that is not
a plain number is refused. ``allowed_ips`` / ``merchant_allowed_ips`` are not faults but the
gateway's source-IP allow list (607), kept here so that they change the same way.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Any

from .allowlist import parse_cidrs

STATUSES = ("success", "pending", "failure")
# Seconds before each retry of a notification, at time scale 1. PagoEfectivo publishes one second
# attempt and not when (API CIP 1.1, §5.2): the sandbox makes it after the first of these. The
# rest, a provider-like schedule over about 2⅓ days (10 s, 1 min, 5 min ... 24 h), is the
# ``notification_retries`` knob's, for rehearsing a gateway that tries for longer.
LONG_RETRY_SCHEDULE_S: tuple[float, ...] = (10, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 86400)


class ChaosError(ValueError):
    """A chaos key is unknown or its value cannot be used; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _default_mix() -> dict[str, float]:
    return {"success": 1.0, "pending": 1.0}


@dataclass(frozen=True)
class ChaosConfig:
    """Every knob; absent from a merge means "keep the value"."""

    latency_ms: float = field(default=0.0, metadata={"kind": "duration", "help": "added to every /v1 answer"})
    jitter_ms: float = field(default=0.0, metadata={"kind": "duration", "help": "random extra latency, 0..N ms"})
    error_rate: float = field(default=0.0, metadata={"kind": "rate", "help": "HTTP 500 (code 166), nothing executed"})
    timeout_after_commit_rate: float = field(
        default=0.0, metadata={"kind": "rate",
                                "help": "a new refund is executed, then its connection dropped unanswered"
                                        " (replays and status lookups are answered)"})
    timeout_hold_s: float = field(
        default=0.0, metadata={"kind": "duration", "help": "seconds to hold a lost answer before dropping it"})
    rate_limited_rate: float = field(default=0.0, metadata={"kind": "rate", "help": "random HTTP 429"})
    retry_after_s: int = field(default=1, metadata={"kind": "seconds", "help": "Retry-After of a random 429"})
    merchant_rate_limits: Mapping[str, float] = field(
        default_factory=dict, metadata={"kind": "limits", "help": 'JSON {"M": per_second} on refund POSTs'})
    notification_duplicate_rate: float = field(
        default=0.0, metadata={"kind": "rate", "help": "a delivered notification is sent again"})
    notification_delay_ms: float = field(
        default=0.0, metadata={"kind": "duration", "help": "every notification waits this long first"})
    notification_reorder_rate: float = field(
        default=0.0, metadata={"kind": "rate", "help": "a notification is held back so later ones overtake it"})
    sync_status_mix: Mapping[str, float] = field(
        default_factory=_default_mix,
        metadata={"kind": "mix", "help": 'JSON weights {"success": w, "pending": w, "failure": w}'})
    notification_retries: int = field(
        default=1, metadata={"kind": "seconds",
                             "help": "attempts after a failed notification: 1 as PagoEfectivo publishes, up to "
                                     f"{len(LONG_RETRY_SCHEDULE_S)} for a provider-like schedule over days"})
    notification_time_scale: float = field(
        default=1.0, metadata={"kind": "scale",
                               "help": "multiplies the notification retry schedule (0.001: seconds become ms)"})
    allowed_ips: tuple[str, ...] = field(
        default=(), metadata={"kind": "cidrs", "help": "source-IP allow list for /v1 calls, CIDR,... (607)"})
    merchant_allowed_ips: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict, metadata={"kind": "merchant_cidrs",
                                        "help": 'JSON {"M": ["CIDR", ...]}: allow list of one merchant (607)'})

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def merged(self, changes: Mapping[str, Any]) -> ChaosConfig:
        """A copy with ``changes`` applied; raises ChaosError naming the first bad key."""
        kinds = {f.name: f.metadata["kind"] for f in fields(self)}
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in kinds:
                raise ChaosError(str(key), "unknown chaos key")
            clean[key] = _VALIDATORS[kinds[key]](key, value)
        if clean.get("notification_retries", 0) > len(LONG_RETRY_SCHEDULE_S):
            raise ChaosError("notification_retries", f"must be at most {len(LONG_RETRY_SCHEDULE_S)}")
        return replace(self, **clean)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ChaosError(key, "must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise ChaosError(key, "must be a finite number")
    return number


def _rate(key: str, value: Any) -> float:
    number = _number(key, value)
    if not 0.0 <= number <= 1.0:
        raise ChaosError(key, "must be between 0 and 1")
    return number


def _duration(key: str, value: Any) -> float:
    number = _number(key, value)
    if number < 0:
        raise ChaosError(key, "must not be negative")
    return number


def _seconds(key: str, value: Any) -> int:
    number = _duration(key, value)
    if not number.is_integer():
        raise ChaosError(key, "must be a whole number of seconds")
    return int(number)


def _limits(key: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ChaosError(key, 'must be an object {"merchant_id": per_second}')
    limits = {}
    for merchant_id, per_second in value.items():
        number = _number(f"{key}.{merchant_id}", per_second)
        if number <= 0:
            raise ChaosError(f"{key}.{merchant_id}", "must be greater than 0")
        limits[str(merchant_id)] = number
    return limits


def _mix(key: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ChaosError(key, 'must be an object {"success": w, "pending": w, "failure": w}')
    mix = {}
    for status, weight in value.items():
        if status not in STATUSES:
            raise ChaosError(f"{key}.{status}", f"unknown status; use {', '.join(STATUSES)}")
        mix[status] = _duration(f"{key}.{status}", weight)
    if sum(mix.values()) <= 0:
        raise ChaosError(key, "needs at least one positive weight")
    return mix


def _scale(key: str, value: Any) -> float:
    number = _number(key, value)
    if number <= 0:
        raise ChaosError(key, "must be greater than 0")
    return number


def _cidrs(key: str, value: Any) -> tuple[str, ...]:
    try:
        return parse_cidrs(value)
    except ValueError as exc:
        raise ChaosError(key, str(exc)) from None


def _merchant_cidrs(key: str, value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ChaosError(key, 'must be an object {"merchant_id": ["CIDR", ...]}')
    lists = {}
    for merchant_id, cidrs in value.items():
        parsed = _cidrs(f"{key}.{merchant_id}", cidrs)
        if parsed:  # an empty list lifts that merchant's restriction
            lists[str(merchant_id)] = parsed
    return lists


_VALIDATORS = {"rate": _rate, "duration": _duration, "seconds": _seconds, "limits": _limits, "mix": _mix,
               "scale": _scale, "cidrs": _cidrs, "merchant_cidrs": _merchant_cidrs}


class Chaos:
    """The current config and the random decisions drawn from it (one event loop, no locks).
    ``rng`` draws every decision; a test may replace it to script which draws hit."""

    def __init__(self, config: ChaosConfig | None = None, *, rng: random.Random | None = None):
        self.config = config or ChaosConfig()
        self.rng = rng or random.Random()
        self._windows: dict[str, deque[float]] = {}

    def update(self, changes: Mapping[str, Any]) -> ChaosConfig:
        self.config = self.config.merged(changes)
        return self.config

    def hit(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def uniform(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    async def latency(self) -> None:
        cfg = self.config
        delay_ms = cfg.latency_ms + (self.rng.uniform(0, cfg.jitter_ms) if cfg.jitter_ms else 0.0)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)

    def over_merchant_limit(self, merchant_id: str, now: float | None = None) -> int | None:
        """Sliding window over refund POSTs: None to let one through, else Retry-After seconds.

        A limit of L per second lets n = max(1, floor(L)) requests through per n/L seconds
        (so 5 means 5 per second and 0.5 means one per 2 seconds). Refused requests do not
        count, so a client that waits Retry-After gets through.
        """
        limit = self.config.merchant_rate_limits.get(merchant_id)
        if limit is None:
            return None
        now = time.monotonic() if now is None else now
        allowed = max(1, math.floor(limit))
        span = allowed / limit
        window = self._windows.setdefault(merchant_id, deque())
        while window and window[0] <= now - span:
            window.popleft()
        if len(window) >= allowed:
            return max(1, math.ceil(window[0] + span - now))
        window.append(now)
        return None

    def draw_status(self) -> str:
        mix = self.config.sync_status_mix
        statuses = [s for s in STATUSES if mix.get(s, 0) > 0]
        return self.rng.choices(statuses, weights=[mix[s] for s in statuses])[0]

    # --- notifications ---------------------------------------------------------------

    def notification_delay(self) -> float:
        """Seconds to wait before the first delivery attempt: the fixed delay, plus a
        random hold-back for the share that is to be overtaken by later notifications."""
        cfg = self.config
        delay = cfg.notification_delay_ms / 1000
        if self.hit(cfg.notification_reorder_rate):
            delay += self.rng.uniform(0.2, 1.0)
        return delay

    def duplicate_notification(self) -> bool:
        return self.hit(self.config.notification_duplicate_rate)
