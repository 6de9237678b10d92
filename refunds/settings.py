"""Configuration from the environment (docs/DEPLOYMENT.md lists it), validated once at start.

Every service reads only the settings it needs through ``require``; a missing or
malformed one stops the process with one line naming it.
"""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from .errors import ConfigError

DEFAULT_BASE_URLS = {
    "sandbox": "https://pre1a.services.pagoefectivo.pe",
    "production": "https://services.pagoefectivo.pe",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    database_url: str | None = None
    # What is between DATABASE_URL and Postgres (docs/DEPLOYMENT.md "PgBouncer"): none (checked on
    # every new connection), a pooler in transaction mode (no named prepared statements), or one
    # that keeps each client's prepared statements (PgBouncer >= 1.21 with max_prepared_statements).
    database_pooler: Literal["none", "transaction", "prepared"] = "none"
    redis_url: str | None = None
    refunds_master_key: str | None = Field(default=None, repr=False)
    refunds_master_key_file: Path | None = None
    # During a master-key rotation: the old key(s), comma-separated base64, still able to open.
    refunds_previous_master_keys: str | None = Field(default=None, repr=False)
    pagoefectivo_env: Literal["sandbox", "production"] = "sandbox"
    pagoefectivo_base_url: str | None = None
    # Worker, refundctl: seconds the gateway has to answer one request; at most half of
    # REFUND_CLAIM_SECONDS, so that a request sent under a claim ends before the claim does.
    pagoefectivo_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    refunds_notify_url: str | None = None
    intake_port: int = Field(default=8080, ge=1, le=65535)
    receiver_port: int = Field(default=8081, ge=1, le=65535)
    # Receiver: networks that may deliver notifications (comma-separated CIDRs; empty: any), and
    # the reverse proxies whose X-Forwarded-For is believed (see receiver/sources.py).
    receiver_allowed_cidrs: str = ""
    receiver_trusted_proxies: str = ""
    # Receiver: where verified notifications wait while Postgres cannot take them (one directory
    # per replica, on a persistent disk; unset: receiver-journal/<RECEIVER_PORT> in the working
    # directory), and the most disk it may use for them (entries counted in 4 KiB blocks; full: 503).
    receiver_journal_dir: Path | None = None
    receiver_journal_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)
    metrics_port: int = Field(default=9191, ge=0, le=65535)
    # The intake's and the receiver's /metrics, on a port of their own (0: not served): never on
    # the public port, where anyone could read merchant ids and their counts.
    intake_metrics_port: int = Field(default=9180, ge=0, le=65535)
    receiver_metrics_port: int = Field(default=9181, ge=0, le=65535)
    # The intake and the receiver (refunds/serving.py): seconds a connection has for a complete
    # request head (from its opening, or the head's first byte), seconds an idle keep-alive
    # connection is kept (above a proxy's upstream keep-alive, 60 s in nginx), and the most
    # connections open at once (more are answered 503 and closed; well under the descriptor limit).
    http_header_timeout: float = Field(default=10, gt=0)
    http_idle_timeout: float = Field(default=75, gt=0)
    http_max_connections: int = Field(default=1024, ge=1)
    # Refund window per payment method, in days (cash: 90 by PagoEfectivo practice).
    refund_window_days: dict[str, Annotated[int, Field(ge=1, le=36500)]] = {"cash": 90, "bank_transfer": 90}
    # Workers: a process silent on Redis this long (a live one polls ten times a second) is
    # presumed dead, and the messages it had fetched go back to their queue for the others.
    worker_dead_after_seconds: float = Field(default=10, ge=2, le=600)
    # Worker: how long one claim on a refund lasts before another delivery may take it over; its
    # holder renews it every quarter of that while it works (workers.claims), and sends only
    # while half of it is left: at least twice PAGOEFECTIVO_TIMEOUT_SECONDS (checked below).
    refund_claim_seconds: int = Field(default=20, ge=5)
    # Producers: refunds handed over together travel in one message, up to this many; a worker
    # thread carries a message's refunds at once, so in flight per worker process is at most
    # threads x this. 1: one message per refund.
    refund_pack_size: int = Field(default=16, ge=1, le=256)
    # Worker: refunds one worker process works on at once, across all its threads' messages
    # (the rest wait their turn, in order): its gateway requests in flight. The default is the
    # Procfile's 8 threads x 16; to hold a rate at a known gateway latency, rate x latency
    # ÷ processes, with threads x REFUND_PACK_SIZE above it so that it stays full.
    worker_in_flight: int = Field(default=128, ge=1, le=1024)
    # Webhooks (docs/WEBHOOKS.md): networks an endpoint may be in although not public (CIDRs,
    # comma-separated; empty: public addresses only), seconds an endpoint has to answer, and
    # the deliveries in flight to one endpoint at once (a slow one never holds the others).
    webhook_allowed_networks: str = ""
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    webhook_endpoint_concurrency: int = Field(default=4, ge=1, le=100)
    # seconds a worker has to record a delivery it was handed; then it goes again (the worker died)
    webhook_lease_seconds: float = Field(default=60.0, ge=5, le=3600)
    # Scheduler: a refund not picked up this long after its hand-off is handed over again.
    refund_outbox_grace_seconds: float = Field(default=30, gt=0)
    # Scheduler: seconds between passes (outbox sweep, status polls, gauges); its /metrics (0: off).
    scheduler_interval: float = Field(default=5, gt=0)
    scheduler_metrics_port: int = Field(default=9192, ge=0, le=65535)
    # Where the services listen (default, and when empty: 0.0.0.0, every interface).
    intake_host: str = "0.0.0.0"
    receiver_host: str = "0.0.0.0"
    metrics_host: str = "0.0.0.0"
    # Off (0): the metrics' merchant label reads "all", for marketplaces with very many sellers.
    refunds_metrics_merchant_label: bool = True
    # Retention: notification dedup rows at least 30 days (providers retry that long), audit
    # rows at least 180 days (every refund auditable for six months).
    notification_retention_days: int = Field(default=45, ge=30)
    audit_retention_days: int = Field(default=400, ge=180)
    log_level: str = "INFO"

    @field_validator("database_url", "redis_url", "pagoefectivo_base_url", "refunds_notify_url")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value.strip().rstrip("/") or None if value else None

    @field_validator("database_url", "redis_url")
    @classmethod
    def _scheme(cls, value: str | None, info) -> str | None:
        """The client's own scheme, and a single host's port (a DSN naming several hosts is asyncpg's
        to check); the message never repeats the URL, which may hold a password."""
        schemes = {"database_url": ("postgresql", "postgres"), "redis_url": ("redis", "rediss", "unix")}[info.field_name]
        if value is None:
            return value
        if value.partition("://")[0] not in schemes:
            raise ValueError(f"must be a URL starting with {' or '.join(f'{scheme}://' for scheme in schemes)}")
        parts = urlsplit(value)
        if "," not in parts.netloc:
            try:
                parts.port  # noqa: B018  (urlsplit checks it when asked)
            except ValueError:
                raise ValueError("its port must be a number from 0 to 65535") from None
        return value

    @field_validator("intake_host", "receiver_host", "metrics_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return value.strip() or "0.0.0.0"

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        import ipaddress

        for part in value.split(","):
            if part.strip():
                try:
                    ipaddress.ip_network(part.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"{part.strip()!r} is not a network such as 10.0.0.0/8") from None
        return value

    @model_validator(mode="after")
    def _claim_outlasts_requests(self) -> "Settings":
        """A request leaves while half its claim is left: that half must outlast the request,
        or another worker could take the refund over and send it again (workers.claims)."""
        if self.refund_claim_seconds < 2 * self.pagoefectivo_timeout_seconds:
            raise ValueError(f"REFUND_CLAIM_SECONDS ({self.refund_claim_seconds}) must be at least twice "
                             f"PAGOEFECTIVO_TIMEOUT_SECONDS ({self.pagoefectivo_timeout_seconds:g}), so that a request "
                             "ends before its claim does")
        return self

    def require(self, name: str):
        """Return a setting that this process cannot run without."""
        value = getattr(self, name)
        if value is None or value == "":
            raise ConfigError(f"{name.upper()} is not set")
        return value

    @property
    def base_url(self) -> str:
        return self.pagoefectivo_base_url or DEFAULT_BASE_URLS[self.pagoefectivo_env]

    def previous_master_keys(self) -> tuple[bytes, ...]:
        keys = []
        for text in (self.refunds_previous_master_keys or "").split(","):
            if text.strip():
                keys.append(_decode_key("REFUNDS_PREVIOUS_MASTER_KEYS", text))
        return tuple(keys)

    def master_key(self) -> bytes:
        """The 32-byte master key from REFUNDS_MASTER_KEY or REFUNDS_MASTER_KEY_FILE."""
        if self.refunds_master_key:
            name, text = "REFUNDS_MASTER_KEY", self.refunds_master_key
        elif self.refunds_master_key_file:
            name = "REFUNDS_MASTER_KEY_FILE"
            try:
                text = self.refunds_master_key_file.read_text()
            except OSError as exc:
                raise ConfigError(f"{name} cannot be read: {exc.strerror}") from None
        else:
            raise ConfigError("REFUNDS_MASTER_KEY is not set (nor REFUNDS_MASTER_KEY_FILE)")
        return _decode_key(name, text)


def _decode_key(name: str, text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name} is not valid base64") from None
    if len(key) != 32:
        raise ConfigError(f"{name} must decode to 32 bytes, not {len(key)}")
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except SettingsError as exc:  # a structured setting (JSON) that does not parse
        field = re.search(r'field "(\w+)"', str(exc))
        name = field[1].upper() if field else "a setting"
        raise ConfigError(f"{name} is malformed: not valid JSON ({exc.__cause__ or exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a rule between settings: its message names them
            raise ConfigError(str(err["msg"]).removeprefix("Value error, ")) from None
        name = str(err["loc"][0]).upper()
        raise ConfigError(f"{name} is malformed: {str(err['msg']).removeprefix('Value error, ')}") from None
