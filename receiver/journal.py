"""A durable local journal of verified notifications that Postgres cannot take right now.

PagoEfectivo expects a 200 and makes only one second attempt on an error (API CIP 1.1, §5.2,
page 14), so a notification answered 503 during a database restart would be lost. Instead,
a notification whose signature verified is written here and answered 200; ``Replayer``
applies it once Postgres is back, through the same parse-and-store path as a live one.

On disk, one file per entry in ``RECEIVER_JOURNAL_DIR``, named ``<sequence>-<merchant>.json``:
the sequence (20 digits) is the arrival clock in nanoseconds, made strictly increasing across
restarts, so name order is arrival order. An entry holds the verified raw body (base64), the
merchant, the headers that matter and the arrival time. It is written to ``<name>.tmp``,
fsynced, renamed, and the directory fsynced, all before the 200; a ``.tmp`` left by a killed
process is a write that was never answered, and is removed at start. An entry is removed
only after Postgres committed it, so a kill between commit and removal replays it: the
notifications table's (merchant, operationNumber) key makes that a harmless duplicate.

The journal is bounded (``RECEIVER_JOURNAL_MAX_BYTES``, counted in 4 KiB blocks per entry, as
the disk holds them); a full journal, or one that cannot write, answers 503. An entry the
database refuses for good (what a live request would answer 400) is moved to ``rejected/``
for an operator. One process at a time may use a directory (an exclusive ``flock``).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from prometheus_client import Counter, Gauge

log = logging.getLogger("receiver.journal")

FORMAT = 1
BLOCK = 4096
KEPT_HEADERS = ("Content-Type", "PE-Signature")  # what a replay or an operator needs; never a secret
_ENTRY = re.compile(r"(?P<sequence>\d{20})-(?P<merchant>[A-Za-z0-9_.-]{1,64})\.json")
REJECTED = "rejected"
LOCK = ".lock"

journal_bytes = Gauge("refund_journal_bytes", "Receiver journal: disk used by waiting entries (4 KiB blocks)")
journal_entries = Gauge("refund_journal_entries", "Receiver journal: notifications waiting to be applied")
journal_max_bytes = Gauge("refund_journal_max_bytes", "Receiver journal: its bound, RECEIVER_JOURNAL_MAX_BYTES")
journal_oldest_seconds = Gauge("refund_journal_oldest_seconds",
                               "Receiver journal: age of the oldest waiting entry (0 when empty)")
journal_rejected_entries = Gauge("refund_journal_rejected_entries",
                                 "Receiver journal: entries the database refused, kept in rejected/ for an operator")
journal_written_total = Counter("refund_journal_written_total", "Notifications answered 200 from the journal")
journal_refused_total = Counter("refund_journal_refused_total",
                                "Notifications the journal could not take (answered 503)", ["reason"])


class JournalError(Exception):
    """The journal cannot take an entry now (disk error), or cannot be opened at all."""


class JournalFull(JournalError):
    """Taking the entry would pass RECEIVER_JOURNAL_MAX_BYTES."""


@dataclass(frozen=True)
class Entry:
    name: str
    merchant_id: str
    received_at: datetime
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)


def _cost(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class Journal:
    """The directory, its lock, and what waits in it (names in arrival order, bytes, per merchant)."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._names: list[str] = []          # visible entries, in name (arrival) order
        self._costs: dict[str, int] = {}
        self._bytes = 0                      # visible and being written
        self._merchants: Tally[str] = Tally()  # visible and being written
        self._last = 0
        self._rejected = 0
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None
        self.added = asyncio.Event()

    # --- life -----------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike, max_bytes: int) -> Journal:
        """Create the directory if needed, lock it, remove torn writes, and read what waits."""
        journal = cls(directory, max_bytes)
        try:
            journal._open()
        except OSError as exc:
            journal.close()
            raise JournalError(f"RECEIVER_JOURNAL_DIR {journal.directory} cannot be used: "
                               f"{exc.strerror or exc}") from None
        except JournalError:
            journal.close()
            raise
        return journal

    def _open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.directory / REJECTED).mkdir(mode=0o700, exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalError(f"RECEIVER_JOURNAL_DIR {self.directory} is in use by another receiver: "
                               "each replica needs its own") from None
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        torn = 0
        for path in self.directory.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink()  # a write killed before its rename: never answered 200
                torn += 1
            elif (match := _ENTRY.fullmatch(path.name)) is not None:
                cost = _cost(path.stat().st_size)
                self._names.append(path.name)
                self._costs[path.name] = cost
                self._bytes += cost
                self._merchants[match["merchant"]] += 1
                self._last = max(self._last, int(match["sequence"]))
        if torn:
            os.fsync(self._dir_fd)
        self._names.sort()
        self._rejected = sum(1 for path in (self.directory / REJECTED).iterdir() if _ENTRY.fullmatch(path.name))
        _export(self)
        if self._names or torn:
            log.warning("journal %s: %d notifications to replay, %d torn writes removed",
                        self.directory, len(self._names), torn)

    def close(self) -> None:
        for fd in (self._dir_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # closing the lock's descriptor releases the flock
        self._dir_fd = self._lock_fd = None

    # --- what waits -------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._names)

    @property
    def rejected(self) -> int:
        return self._rejected

    def holds(self, merchant_id: str) -> bool:
        """True while older notifications of this merchant wait (or are being written)."""
        return self._merchants[merchant_id] > 0

    def oldest(self) -> str | None:
        return self._names[0] if self._names else None

    def oldest_age(self) -> float:
        if not self._names:
            return 0.0
        return max(0.0, time.time() - int(self._names[0][:20]) / 1e9)

    # --- writing ------------------------------------------------------------------------------

    async def append(self, merchant_id: str, body: bytes, headers: Mapping[str, str], received_at: datetime) -> str:
        """Write one entry durably (file and directory fsynced); its name once it is safe to answer 200.

        Raises JournalFull, or JournalError when the disk refuses.
        """
        data = json.dumps({
            "format": FORMAT, "merchant_id": merchant_id, "received_at": received_at.isoformat(),
            "headers": {name: headers[name] for name in KEPT_HEADERS if name in headers},
            "body": base64.b64encode(body).decode("ascii"),
        }, separators=(",", ":")).encode()
        cost = _cost(len(data))
        if self._bytes + cost > self.max_bytes:
            journal_refused_total.labels("full").inc()
            raise JournalFull(f"journal full ({self._bytes} of {self.max_bytes} bytes)")
        self._last = max(time.time_ns(), self._last + 1)
        name = f"{self._last:020d}-{merchant_id}.json"
        self._bytes += cost  # reserved now, so concurrent writes cannot pass the bound together
        self._merchants[merchant_id] += 1  # and later notifications of this merchant queue behind it
        try:
            await asyncio.to_thread(self._write, name, data)
        except BaseException as exc:
            self._bytes -= cost
            self._merchants[merchant_id] -= 1
            if isinstance(exc, OSError):
                journal_refused_total.labels("error").inc()
                raise JournalError(f"journal write failed: {exc.strerror or exc}") from None
            raise
        bisect.insort(self._names, name)
        self._costs[name] = cost
        journal_written_total.inc()
        self.added.set()
        return name

    def _write(self, name: str, data: bytes) -> None:
        temporary = self.directory / f"{name}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, self.directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        os.fsync(self._dir_fd)  # the rename itself is durable before the sender hears 200

    # --- reading back -------------------------------------------------------------------------

    def read(self, name: str) -> Entry:
        """The entry; ValueError when the file does not hold one (it is then set aside)."""
        raw = json.loads((self.directory / name).read_bytes())
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("not a journal entry of a known format")
        received_at = datetime.fromisoformat(raw["received_at"])
        if received_at.tzinfo is None:
            raise ValueError("received_at has no time zone")
        return Entry(name, str(raw["merchant_id"]), received_at, dict(raw["headers"]),
                     base64.b64decode(raw["body"], validate=True))

    def remove(self, name: str) -> None:
        """The database committed it: forget it (a removal lost to a crash replays a duplicate)."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / name).unlink()
        self._forget(name)

    def reject(self, name: str, reason: str) -> None:
        """Move an entry the database refuses for good to ``rejected/``, for an operator."""
        os.rename(self.directory / name, self.directory / REJECTED / name)
        os.fsync(self._dir_fd)
        self._forget(name)
        self._rejected += 1
        log.error("journal entry %s rejected (%s): kept in %s", name, reason, self.directory / REJECTED)

    def _forget(self, name: str) -> None:
        index = bisect.bisect_left(self._names, name)
        if index < len(self._names) and self._names[index] == name:
            del self._names[index]
            self._bytes -= self._costs.pop(name)
            self._merchants[name[21:-5]] -= 1


_current: list[Journal] = []


def _export(journal: Journal) -> None:
    """The gauges read this process's journal when Prometheus scrapes."""
    _current[:] = [journal]
    journal_bytes.set_function(lambda: _current[0].bytes)
    journal_entries.set_function(lambda: len(_current[0]))
    journal_max_bytes.set_function(lambda: _current[0].max_bytes)
    journal_oldest_seconds.set_function(lambda: _current[0].oldest_age())
    journal_rejected_entries.set_function(lambda: _current[0].rejected)


# --- replaying -------------------------------------------------------------------------------

# an entry through the live path: 200 stored (or a duplicate), 400 refused for good, else retry later
Apply = Callable[[Entry], Awaitable[int]]


class Replayer:
    """Applies the journal's entries one at a time, oldest first, while the receiver runs."""

    def __init__(self, journal: Journal, apply: Apply, *, retry_interval: float = 1.0):
        self.journal = journal
        self._apply = apply
        self._retry_interval = retry_interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="journal-replayer")

    async def stop(self) -> None:
        """Cancel it (an entry cut off mid-apply stays, and replays as a duplicate at worst)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        waiting = False  # logged once per outage, not at every retry
        while True:
            name = self.journal.oldest()
            if name is None:
                self.journal.added.clear()
                await self.journal.added.wait()
                continue
            try:
                status = await self._replay(name)
            except Exception:  # a bug or a disk error: keep the entry, say so, try again later
                log.exception("journal entry %s could not be replayed; retrying", name)
                status = 503
            if status in (200, 400):
                if waiting:
                    log.info("journal replay resumed (%d notifications left)", len(self.journal))
                    waiting = False
                continue
            if not waiting:
                log.warning("journal replay waits for Postgres (%d notifications)", len(self.journal))
                waiting = True
            await asyncio.sleep(self._retry_interval)

    async def _replay(self, name: str) -> int:
        """Apply one entry; 200 and 400 are done with it (removed, or set aside), else it stays."""
        try:
            entry = await asyncio.to_thread(self.journal.read, name)
        except (ValueError, KeyError, TypeError) as exc:
            self.journal.reject(name, f"unreadable: {type(exc).__name__}")
            return 400
        status = await self._apply(entry)
        if status == 200:
            self.journal.remove(name)
        elif status == 400:
            self.journal.reject(name, "the database refuses it")
        return status
