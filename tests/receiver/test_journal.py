"""The receiver's journal: no verified notification lost while Postgres is down, even when the
receiver is killed with SIGKILL while writing or replaying it.

The process tests run a private Postgres that they stop and start (the embedded one, whose
postmaster they stop with SIGINT and start again from its own ``postmaster.opts``, on the same
port), and the real ``python -m receiver``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, generate_latest

from pagoefectivo.protocol import SIGNATURE_HEADER, dumps
from receiver import create_app
from receiver.credentials import KeyCache, Secret
from receiver.journal import BLOCK, REJECTED, Journal, JournalError
from refunds import db as dbmod
from refunds.records import find_by_external_ref, refund_events

from tests.conftest import TABLES
from tests.helpers import ROOT
from tests.receiver.test_receiver import (_env, _free_port, cip_paid, fixed_loader, make_refund, notification_rows,
                                          post, refund_event)

try:  # the embedded servers are moving from refunds/ to refundctl/
    from refundctl.embedded import embedded_postgres
except ImportError:  # pragma: no cover - before the move
    from refunds.embedded import embedded_postgres


# --- a Postgres that stops and starts ---------------------------------------------------------

class Postgres:
    """The embedded Postgres, stopped (fast shutdown) and started again on the same port and data."""

    def __init__(self, url: str, data: Path):
        self.url = url
        self.data = data
        self.command = shlex.split((data / "postmaster.opts").read_text())
        self._restarted: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while self.running:  # the postmaster removes its pid file last
            assert time.monotonic() < deadline, "Postgres did not stop"
            time.sleep(0.02)
        if self._restarted is not None:
            self._restarted.wait(10)
            self._restarted = None

    def start(self) -> None:
        owner = self.data.stat()
        as_owner = {"user": owner.st_uid, "group": owner.st_gid} if os.getuid() == 0 else {}
        with open(self.data.parent / "restarted.log", "ab") as log:
            self._restarted = subprocess.Popen(self.command, cwd=self.data.parent, stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               **as_owner)

    async def start_async(self) -> None:
        await asyncio.to_thread(self.start)
        await self._wait_ready()

    async def stop_async(self) -> None:
        await asyncio.to_thread(self.stop)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = await asyncpg.connect(self.url, timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                assert self._restarted.poll() is None, "Postgres exited at start"
                assert time.monotonic() < deadline, "Postgres did not accept connections"
                await asyncio.sleep(0.05)
                continue
            await conn.close()
            return


@pytest.fixture(scope="module")
def stoppable_postgres():
    with embedded_postgres() as url:
        async def prepare() -> Path:
            await dbmod.migrate(url)
            conn = await asyncpg.connect(url)
            try:
                return Path(await conn.fetchval("SHOW data_directory"))
            finally:
                await conn.close()

        postgres = Postgres(url, asyncio.run(prepare()))
        try:
            yield postgres
        finally:
            if postgres.running and postgres._restarted is not None:
                postgres.stop()  # the one we started; embedded_postgres stops its own


@pytest_asyncio.fixture
async def postgres(stoppable_postgres):
    if not stoppable_postgres.running:  # a test that failed with it stopped
        await stoppable_postgres.start_async()
    return stoppable_postgres


@pytest_asyncio.fixture
async def db(postgres):
    """conftest's ``db`` on the stoppable Postgres, so that ``make_merchant`` makes merchants there."""
    conn = await dbmod.connect(postgres.url)
    await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)


# --- the receiver process ---------------------------------------------------------------------

class Receiver:
    """``python -m receiver`` on the stoppable Postgres, with its journal in ``journal_dir``."""

    def __init__(self, database_url: str, master_key: str, journal_dir: Path, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.journal_dir = journal_dir
        self.env = _env(DATABASE_URL=database_url, REFUNDS_MASTER_KEY=master_key, RECEIVER_PORT=str(self.port),
                        RECEIVER_HOST="127.0.0.1", RECEIVER_JOURNAL_DIR=str(journal_dir), LOG_LEVEL="INFO")
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "receiver", cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc.returncode is None, self.log()
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the receiver did not start\n" + self.log()
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.journal_dir.iterdir() if p.name.endswith(".json"))

    def torn(self) -> list[str]:
        return [p.name for p in self.journal_dir.iterdir() if p.name.endswith(".tmp")]


@pytest_asyncio.fixture
async def receiver(postgres, master_key, tmp_path):
    proc = Receiver(postgres.url, master_key, tmp_path / "journal", tmp_path / "receiver.log")
    try:
        yield proc
    finally:
        await proc.stop()


async def send(url: str, merchant_id: str, payload: dict, secret: str) -> dict | None:
    """One delivery: the JSON answer of a 200, else None (refused, or no answer at all)."""
    try:
        async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=20)) as http:
            response = await post(http, merchant_id, payload, secret)
            return await response.json() if response.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def wait_until(predicate, what: str, receiver: Receiver, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen\n{receiver.log()}"
        await asyncio.sleep(0.05)


async def stored_keys(url: str) -> set[tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        return {(r["merchant_id"], r["operation_number"])
                for r in await conn.fetch("SELECT merchant_id, operation_number FROM notifications")}
    finally:
        await conn.close()


# --- the process, killed while writing and while replaying --------------------------------------

@pytest.mark.chaos
async def test_every_accepted_notification_is_applied_once_across_sigkills(postgres, db, make_merchant, receiver):
    rng = random.Random()
    merchants = {m: await make_merchant(m) for m in ("m1", "m2")}
    planned: dict[tuple[str, str], dict] = {}  # (merchant, operationNumber) -> payload
    refunds = []
    for round_ in range(3):
        for merchant_id in merchants:
            for i in range(25):
                op = f"op-{round_}-{merchant_id}-{i}"
                planned[(merchant_id, op)] = cip_paid(op, f"cip-{round_}-{i}", Decimal(f"{i + 1}.10"),
                                                      merchantId=merchant_id)
            for i in range(15):
                refund = await make_refund(db, merchant_id, external_ref=f"R-{round_}-{merchant_id}-{i}")
                refunds.append(refund)
                op = f"op-r-{round_}-{merchant_id}-{i}"
                planned[(merchant_id, op)] = refund_event("refund.succeeded", refund, op)
    await db.close()
    killed_mid_replay = 0

    async def deliver(key) -> tuple[tuple[str, str], dict | None]:
        merchant_id, _ = key
        return key, await send(receiver.url, merchant_id, planned[key], merchants[merchant_id].secret_key)

    for round_ in range(3):
        keys = [k for k in planned if k[1].startswith((f"op-{round_}-", f"op-r-{round_}-"))]
        rng.shuffle(keys)
        await receiver.start()
        for merchant_id, merchant in merchants.items():  # Postgres up: the secrets are read and cached
            assert await send(receiver.url, merchant_id, cip_paid(f"warm-{round_}", f"warm-{round_}",
                                                                  merchantId=merchant_id), merchant.secret_key)
        await postgres.stop_async()

        # Postgres down: notifications journalled, the receiver killed after a random number of 200s
        kill_after = rng.randint(10, len(keys) - 10)  # a journal long enough for its replay to be cut short
        accepted: set[tuple[str, str]] = set()
        answered = asyncio.Event()
        queue = list(keys)

        async def sender():
            while queue:
                key, answer = await deliver(queue.pop())
                if answer is not None:
                    assert answer == {"result": "journalled"}, answer
                    accepted.add(key)
                    if len(accepted) >= kill_after:
                        answered.set()

        senders = [asyncio.create_task(sender()) for _ in range(8)]
        await asyncio.wait_for(answered.wait(), 60)
        await asyncio.sleep(rng.uniform(0, 0.02))
        await receiver.kill()
        queue.clear()
        await asyncio.gather(*senders)
        assert len(receiver.entries()) >= len(accepted)

        # started again, still without Postgres: torn writes gone, the replayer waits
        await receiver.start()
        assert receiver.torn() == []
        waiting = len(receiver.entries())

        # Postgres back: killed at a random point of the replay, started again, the journal drains
        await postgres.start_async()
        target = rng.randint(max(1, waiting // 4), max(1, 3 * waiting // 4))  # mid-replay, not at either end
        deadline = time.monotonic() + 60
        while len(receiver.entries()) > target:
            assert time.monotonic() < deadline, receiver.log()
            await asyncio.sleep(0.002)
        left = len(receiver.entries())
        await receiver.kill()
        killed_mid_replay += 0 < left < waiting
        await receiver.start()
        await wait_until(lambda: not receiver.entries(), "the replay", receiver)

        stored = await stored_keys(postgres.url)
        assert accepted <= stored, f"accepted but lost: {sorted(accepted - stored)}"
        # what was not answered 200 comes again (PagoEfectivo's second attempt), now live
        for key in keys:
            if key not in accepted:
                assert (await deliver(key))[1] is not None
        await receiver.kill()

    assert killed_mid_replay >= 2, "the replay was too quick to be interrupted"
    assert list((receiver.journal_dir / REJECTED).iterdir()) == []
    conn = await dbmod.connect(postgres.url)
    try:
        rows = await conn.fetch("SELECT merchant_id, operation_number, result FROM notifications")
        warm = {(m, f"warm-{r}") for m in merchants for r in range(3)}
        assert sorted((r["merchant_id"], r["operation_number"]) for r in rows) == sorted({*planned, *warm})
        assert {r["result"] for r in rows} == {"applied"}
        payments = {(r["merchant_id"], r["transaction_id"]): r["amount"] for r in await conn.fetch(
            "SELECT merchant_id, transaction_id, amount FROM payments WHERE transaction_id LIKE 'cip-%'")}
        assert payments == {(m, p["data"]["cip"]): p["data"]["amount"]
                            for (m, _), p in planned.items() if p["eventType"] == "cip.paid"}
        for refund in refunds:
            assert (await find_by_external_ref(conn, refund["merchant_id"], refund["external_ref"])).state == "succeeded"
            assert len(await refund_events(conn, refund["refund_id"])) == 1  # moved once
    finally:
        await conn.close()


@pytest.mark.slow
async def test_replay_keeps_each_merchants_arrival_order(postgres, db, make_merchant, receiver):
    m1, m2 = await make_merchant("m1"), await make_merchant("m2")
    refunds = [await make_refund(db, "m1", external_ref=f"R-{i}") for i in range(20)]
    await db.close()
    await receiver.start()
    assert await send(receiver.url, "m1", cip_paid("warm", "warm"), m1.secret_key)
    assert await send(receiver.url, "m2", cip_paid("warm", "warm", merchantId="m2"), m2.secret_key)
    await postgres.stop_async()
    for i, refund in enumerate(refunds):  # each refund: succeeded, then failed; m2 in between
        assert await send(receiver.url, "m1", refund_event("refund.succeeded", refund, f"ok-{i}"), m1.secret_key)
        assert await send(receiver.url, "m2", cip_paid(f"p-{i}", f"p-{i}", merchantId="m2"), m2.secret_key)
        assert await send(receiver.url, "m1", refund_event("refund.failed", refund, f"ko-{i}"), m1.secret_key)
    last = refunds[-1]
    await postgres.start_async()
    # Postgres answers again, but older notifications of m1 still wait: a new one goes behind them
    answer = await send(receiver.url, "m1", refund_event("refund.failed", last, "ko-late"), m1.secret_key)
    assert answer == {"result": "journalled"}
    await wait_until(lambda: not receiver.entries(), "the replay", receiver)
    conn = await dbmod.connect(postgres.url)
    try:
        for i, refund in enumerate(refunds):
            assert (await find_by_external_ref(conn, "m1", refund["external_ref"])).state == "succeeded"
        results = {r["operation_number"]: r["result"] for r in await notification_rows(conn, "m1")}
        assert {op: results[op] for op in ("ok-0", "ko-0", "ok-19", "ko-19", "ko-late")} == {
            "ok-0": "applied", "ko-0": "late", "ok-19": "applied", "ko-19": "late", "ko-late": "late"}
        assert len(await notification_rows(conn, "m2")) == 21
    finally:
        await conn.close()


async def test_a_locked_journal_directory_stops_the_process_with_one_line(database_url, master_key, tmp_path):
    journal = Journal.open(tmp_path / "journal", 1 << 20)
    try:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "receiver"], cwd=ROOT, capture_output=True, text=True,
            timeout=60, env=_env(DATABASE_URL=database_url, REFUNDS_MASTER_KEY=master_key,
                                 RECEIVER_JOURNAL_DIR=str(tmp_path / "journal"), RECEIVER_PORT=str(_free_port())))
    finally:
        journal.close()
    assert done.returncode == 2
    assert done.stderr.strip() == (f"receiver: RECEIVER_JOURNAL_DIR {tmp_path / 'journal'} is in use by another "
                                   "receiver: each replica needs its own")


# --- in process ---------------------------------------------------------------------------------

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"


async def test_a_full_journal_answers_503_and_keeps_what_it_took(vault, tmp_path):
    journal = Journal.open(tmp_path / "journal", 2 * BLOCK)
    app = create_app(database_url=UNREACHABLE, vault=vault, keys=KeyCache(fixed_loader(Secret("s3cret"))),
                     journal=journal)
    try:
        async with TestClient(TestServer(app)) as client:
            first, second, third = [await post(client, "m1", cip_paid(f"op-{i}", str(i)), "s3cret") for i in range(3)]
            assert (first.status, await first.json()) == (200, {"result": "journalled"})
            assert (second.status, await second.json()) == (200, {"result": "journalled"})
            assert third.status == 503
            assert (await post(client, "m1", cip_paid("op-x"), "not-the-secret")).status == 401  # never journalled
            assert (await client.get("/readyz")).status == 503  # no database, no room
            metrics = generate_latest(REGISTRY).decode()
            assert "refund_journal_entries 2.0" in metrics and f"refund_journal_max_bytes {2 * BLOCK}.0" in metrics
    finally:
        journal.close()
    names = sorted(p.name for p in (tmp_path / "journal").iterdir() if p.name.endswith(".json"))
    assert [name.split("-", 1)[1] for name in names] == ["m1.json", "m1.json"]
    entry = json.loads((tmp_path / "journal" / names[0]).read_text())
    assert entry["merchant_id"] == "m1" and datetime.fromisoformat(entry["received_at"]).tzinfo is not None
    assert set(entry["headers"]) == {"Content-Type", SIGNATURE_HEADER}
    reopened = Journal.open(tmp_path / "journal", 2 * BLOCK)
    try:
        assert reopened.read(names[0]).body == dumps(cip_paid("op-0", "0"))  # the verified bytes, exactly
    finally:
        reopened.close()


async def test_with_room_in_the_journal_the_receiver_stays_ready_without_postgres(vault, tmp_path):
    journal = Journal.open(tmp_path / "journal", 1 << 20)
    try:
        app = create_app(database_url=UNREACHABLE, vault=vault, keys=KeyCache(fixed_loader(Secret("s"))),
                         journal=journal)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/readyz")
            assert (response.status, await response.json()) == (200, {"status": "journalling",
                                                                      "database": "unavailable"})
    finally:
        journal.close()


async def test_at_start_torn_writes_are_removed_and_unreadable_entries_set_aside(postgres, vault, tmp_path,
                                                                                 make_merchant, db):
    merchant = await make_merchant("m1")
    directory = tmp_path / "journal"
    journal = Journal.open(directory, 1 << 20)
    app = create_app(database_url=UNREACHABLE, vault=vault, journal=journal,
                     keys=KeyCache(fixed_loader(Secret(merchant.secret_key))))
    async with TestClient(TestServer(app)) as client:
        for i in range(3):
            assert (await post(client, "m1", cip_paid(f"op-{i}", f"c-{i}"), merchant.secret_key)).status == 200
    journal.close()
    (directory / "00000000000000000001-m1.json.tmp").write_bytes(b'{"format": 1, "merch')  # killed mid-write
    (directory / "00000000000000000002-m1.json").write_bytes(b"not json")

    journal = Journal.open(directory, 1 << 20)
    assert list(directory.glob("*.tmp")) == [] and len(journal) == 4
    app = create_app(database_url=postgres.url, vault=vault, journal=journal)
    try:
        async with TestClient(TestServer(app)):
            deadline = time.monotonic() + 30
            while len(journal):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
    finally:
        journal.close()
    assert [p.name for p in (directory / REJECTED).iterdir()] == ["00000000000000000002-m1.json"]
    rows = await notification_rows(db)
    assert sorted(r["operation_number"] for r in rows) == ["op-0", "op-1", "op-2"]
    assert {r["result"] for r in rows} == {"applied"}


def test_two_journals_cannot_share_a_directory(tmp_path):
    first = Journal.open(tmp_path, 1 << 20)
    try:
        with pytest.raises(JournalError, match="in use by another receiver"):
            Journal.open(tmp_path, 1 << 20)
    finally:
        first.close()
    Journal.open(tmp_path, 1 << 20).close()  # released with its descriptor
