"""refundctl reconcile against the real sandbox gateway, with its faults on: each merchant's lookups
within its rate limit, transient errors and random 429s retried, a period larger than a page
streamed with every refund checked once, a stopped run resumed, its exit statuses, and its
progress bar on a real terminal."""

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest
import pytest_asyncio

import refundctl.reconcile as reconcile
from pagoefectivo import protocol
from refundctl.reconcile import LedgerError, against_ledger, check_period, count_to_check, read_ledger
from tests.refunds.test_reports import PERIOD, refundctl
from tests.stack import chaos, start_stack
from tests.workers.test_worker import accepted_refund, ledger, settle_all

LIMITS = {"m1": 5, "m2": 3}
PER_MERCHANT = 12


def recorder(seen: list) -> aiohttp.TraceConfig:
    """Every request the gateway client sends: (monotonic time, method, path, merchant), and each answer:
    ("status", status, method, path)."""
    trace = aiohttp.TraceConfig()

    async def start(session, context, params):
        seen.append((time.monotonic(), params.method, params.url.path, params.headers.get(protocol.MERCHANT_HEADER)))

    async def end(session, context, params):
        seen.append(("status", params.response.status, params.method, params.url.path))

    trace.on_request_start.append(start)
    trace.on_request_end.append(end)
    return trace


@pytest_asyncio.fixture
async def settled(db, make_merchant, database_url, redis_url, vault, monkeypatch):
    """Refunds of two merchants that went through the sandbox and succeeded; then the merchants'
    rate limits lowered to LIMITS, for reconcile to keep to."""
    seen: list = []
    for merchant in LIMITS:
        await make_merchant(merchant)
    async with start_stack(database_url, redis_url, vault, monkeypatch, trace_configs=[recorder(seen)]) as stack:
        await chaos(stack.http, stack.sandbox_url, sync_status_mix={"success": 1})
        ids = [(await accepted_refund(stack, db, external_ref=f"{m}-{i}", amount="1.00", merchant=m)).refund_id
               for m in LIMITS for i in range(PER_MERCHANT)]
        await settle_all(stack.res, db, ids)
        assert await db.fetchval("SELECT count(*) FROM refunds WHERE state = 'succeeded'") == len(ids)
        for merchant, limit in LIMITS.items():
            await db.execute("UPDATE merchants SET rate_limit = $2 WHERE merchant_id = $1", merchant, limit)
        seen.clear()
        yield stack, seen


def hour_around_now() -> tuple[datetime, datetime]:
    now = datetime.now(timezone.utc)
    return now - timedelta(hours=1), now + timedelta(hours=1)


def statuses(seen: list) -> list[int]:
    """The statuses of the answers to status lookups."""
    return [status for _, status, method, path in (e for e in seen if e[0] == "status")
            if method == "GET" and path.startswith(protocol.REFUNDS_PATH)]


def lookups(seen: list) -> list[tuple[float, str, str]]:
    """The status lookups sent: (when, merchant, external_ref)."""
    return [(when, merchant, path.removeprefix(protocol.REFUNDS_PATH).strip("/"))
            for when, method, path, merchant in (e for e in seen if e[0] != "status")
            if method == "GET" and path.startswith(protocol.REFUNDS_PATH)]


@pytest.mark.slow
async def test_lookups_keep_to_each_merchants_rate_limit_and_transient_errors_are_retried(db, settled):
    stack, seen = settled
    stack.first_draws_hit(3)  # three faults, fewer than a lookup's tries whichever lookups meet them
    await chaos(stack.http, stack.sandbox_url, error_rate=0.2)
    checked = []
    await check_period(db, stack.res.client, stack.res.vault, stack.res.limiter, *hour_around_now(), checked.append)

    assert sorted(c.external_ref for c in checked) == sorted(f"{m}-{i}" for m in LIMITS for i in range(PER_MERCHANT))
    assert all(c.found == () for c in checked)
    assert statuses(seen).count(500) == 3 and 429 not in statuses(seen)  # faults met, and retried: every refund answered
    by_merchant = defaultdict(list)
    for when, merchant, _ in lookups(seen):
        by_merchant[merchant].append(when)
    for merchant, limit in LIMITS.items():
        times = sorted(by_merchant[merchant])
        assert len(times) >= PER_MERCHANT
        busiest = max(sum(1 for t in times if first <= t < first + 1.0) for first in times)
        assert busiest <= limit, (merchant, busiest)


@pytest.mark.slow
async def test_a_period_larger_than_a_page_is_streamed_each_refund_checked_once_with_bounded_memory(
        db, settled, monkeypatch):
    stack, seen = settled
    page_size, in_flight = 5, 3
    held = {"read": 0, "checked": 0, "most": 0, "pages": 0}
    read_page = reconcile.refunds_in_period

    async def counted(*args, **kwargs):  # every read of the period, and how many refunds are held after it
        page = await read_page(*args, **kwargs)
        assert kwargs["limit"] <= page_size
        held["read"] += len(page)
        held["pages"] += 1
        held["most"] = max(held["most"], held["read"] - held["checked"])
        return page

    def on_checked(checked) -> None:
        held["checked"] += 1
        found.append(checked)

    found = []
    monkeypatch.setattr(reconcile, "refunds_in_period", counted)
    await db.execute("UPDATE refunds SET state = 'failed' WHERE external_ref = 'm2-7'")
    period = hour_around_now()
    await check_period(db, stack.res.client, stack.res.vault, stack.res.limiter, *period, on_checked,
                       page_size=page_size, max_in_flight=in_flight)

    everyone = sorted(f"{m}-{i}" for m in LIMITS for i in range(PER_MERCHANT))
    assert await count_to_check(db, *period) == len(everyone)
    assert sorted(c.external_ref for c in found) == everyone  # each refund checked, once
    assert sorted(ref for _, _, ref in lookups(seen)) == everyone  # and asked about once
    assert [(d.kind, d.external_ref, d.ours, d.theirs) for c in found for d in c.found] == [
        ("state", "m2-7", "failed", "success")]
    assert held["pages"] >= len(everyone) // page_size  # streamed: never more than a page read at once
    assert held["most"] <= page_size + in_flight, held  # refunds waiting, plus those being asked about


@pytest.mark.slow
async def test_random_429s_are_waited_out_and_the_findings_are_right(db, settled):
    stack, seen = settled
    await db.execute("UPDATE refunds SET state = 'pending' WHERE external_ref = 'm1-3'")
    stack.first_draws_hit(4)
    await chaos(stack.http, stack.sandbox_url, rate_limited_rate=0.3, retry_after_s=1)
    found = []
    await check_period(db, stack.res.client, stack.res.vault, stack.res.limiter, *hour_around_now(),
                       found.append, page_size=10)

    everyone = sorted(f"{m}-{i}" for m in LIMITS for i in range(PER_MERCHANT))
    assert sorted(c.external_ref for c in found) == everyone
    assert [(d.kind, d.external_ref, d.ours, d.theirs) for c in found for d in c.found] == [
        ("state", "m1-3", "pending", "success")]
    answered = Counter(statuses(seen))
    asked = Counter(ref for _, _, ref in lookups(seen))
    assert answered[429] == 4 and answered[200] == len(everyone), answered  # 429s met, every refund answered
    assert sum(asked.values()) == len(everyone) + answered[429]  # each 429 retried, nothing asked twice else
    assert set(asked) == set(everyone)


async def test_the_ledger_is_checked_a_page_at_a_time_on_both_sides(db, settled):
    stack, _ = settled
    entries = await ledger(stack.http, stack.sandbox_url)
    assert len(entries) == len(LIMITS) * PER_MERCHANT
    entries = [e for e in entries if e["externalRef"] != "m1-4"]  # executed by us, not by the gateway
    next(e for e in entries if e["externalRef"] == "m2-9")["refundAmount"] = "7.00"
    entries.append({**entries[0], "externalRef": "never-ours", "refundAmount": "3.00"})
    older = datetime.now(timezone.utc) - timedelta(days=40)  # ours, of another period: not a disagreement
    await db.execute("UPDATE refunds SET created_at = $1 WHERE external_ref = 'm2-0'", older)
    next(e for e in entries if e["externalRef"] == "m2-0")["refundAmount"] = "9.00"
    next(e for e in entries if e["externalRef"] == "m1-7")["currency"] = "USD"  # the ledger's entries carry one

    found = [d async for d in against_ledger(db, read_ledger(entries), *hour_around_now(), page_size=4)]
    assert sorted((d.kind, d.external_ref, d.ours, d.theirs) for d in found) == [
        ("amount", "m2-9", "1.00", "7.00"),
        ("currency", "m1-7", "PEN", "USD"),
        ("missing_at_gateway", "m1-4", "succeeded", "not in ledger"),
        ("missing_in_database", "never-ours", "none", "executed 3.00"),
    ]
    without_currency = [{k: v for k, v in e.items() if k != "currency"} for e in entries]  # amounts alone, then
    found = [d async for d in against_ledger(db, read_ledger(without_currency), *hour_around_now(), page_size=4)]
    assert "currency" not in {d.kind for d in found} and len(found) == 3


ENTRY = {"merchantId": "m1", "externalRef": "R-1", "refundAmount": "1.00", "currency": "PEN",
         "executedAt": "2026-11-20T10:00:00-05:00"}


@pytest.mark.parametrize("document, problem", [
    ({"refunds": [ENTRY]}, "not a list of executed refunds: the document is an object"),
    ("[]", "not a list of executed refunds: the document is a string"),
    ([ENTRY, {k: v for k, v in ENTRY.items() if k != "merchantId"}], "entry 1 (counting from 0): merchantId is missing"),
    ([{k: v for k, v in ENTRY.items() if k != "externalRef"}], "entry 0 (counting from 0): externalRef is missing"),
    ([ENTRY, ENTRY, {k: v for k, v in ENTRY.items() if k != "refundAmount"}],
     "entry 2 (counting from 0): refundAmount is missing"),
    ([{**ENTRY, "refundAmount": None}], "entry 0 (counting from 0): refundAmount is missing"),
    ([{**ENTRY, "refundAmount": "1,00"}], "entry 0 (counting from 0): refundAmount '1,00' is not an amount"),
    ([{**ENTRY, "refundAmount": "NaN"}], "entry 0 (counting from 0): refundAmount 'NaN' is not an amount"),
    ([{**ENTRY, "refundAmount": True}], "entry 0 (counting from 0): refundAmount true or false is not an amount"),
    ([{**ENTRY, "refundAmount": {"value": 1}}], "entry 0 (counting from 0): refundAmount an object is not an amount"),
    ([ENTRY, {**ENTRY, "refundAmount": "-5"}], "entry 1 (counting from 0): refundAmount must be greater than 0"),
    ([{**ENTRY, "refundAmount": "0"}], "entry 0 (counting from 0): refundAmount must be greater than 0"),
    ([{**ENTRY, "refundAmount": "10.005"}], "entry 0 (counting from 0): refundAmount 10.005 has more than 2 decimals"),
    ([{**ENTRY, "refundAmount": "1e400"}], "entry 0 (counting from 0): refundAmount 1E+400 is over 999999999999.99"),
    ([{**ENTRY, "merchantId": 7}], "entry 0 (counting from 0): merchantId is a number, not a string"),
    ([{**ENTRY, "externalRef": ""}], "entry 0 (counting from 0): externalRef is empty"),
    ([{**ENTRY, "currency": ["PEN"]}], "entry 0 (counting from 0): currency is a list, not a string"),
    ([ENTRY, ["m1", "R-2", "1.00"]], "entry 1 (counting from 0): a list, not an object"),
])
def test_a_malformed_ledger_is_refused_whole_naming_its_first_bad_entry(document, problem):
    with pytest.raises(LedgerError) as caught:
        read_ledger(document)
    assert str(caught.value) == problem


def test_a_ledger_entry_is_read_with_its_currency_or_without_one():
    from decimal import Decimal

    from pagoefectivo.protocol import loads

    document = loads(json.dumps([ENTRY, {**ENTRY, "externalRef": "R-2", "refundAmount": 2.5, "currency": None},
                                 {"merchantId": "m2", "externalRef": "R-3", "refundAmount": 3}]))
    assert [(e.merchant_id, e.external_ref, e.amount, e.currency) for e in read_ledger(document)] == [
        ("m1", "R-1", Decimal("1.00"), "PEN"), ("m1", "R-2", Decimal("2.5"), None), ("m2", "R-3", Decimal(3), None)]
    assert read_ledger([]) == []


def drain(fd: int, into: bytearray) -> threading.Thread:
    """Read a pseudo-terminal's master side into ``into`` until its other side is closed."""
    def read() -> None:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every holder of the terminal's side closed it
                return
            if not chunk:
                return
            into.extend(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


async def on_a_terminal(*args: str, **env: str) -> tuple[int, str, str]:
    """The real ``refundctl`` with stderr on a pseudo-terminal (as an operator's shell gives it) and
    stdout on a pipe (as a script reads it): exit status, stdout, and what the terminal showed."""
    import pty

    master, terminal = pty.openpty()
    shown = bytearray()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "refundctl", *args, stdout=asyncio.subprocess.PIPE, stderr=terminal,
            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", **env})
    finally:
        os.close(terminal)  # the child holds it now: its exit closes the last one
    reader = drain(master, shown)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        await asyncio.to_thread(reader.join, 10)
    finally:
        os.close(master)
    return process.returncode, out.decode(), shown.decode(errors="replace")


@pytest.mark.slow
async def test_the_progress_bar_is_drawn_on_a_terminal_and_stdout_stays_clean(db, settled):
    stack, _ = settled
    env = {"PAGOEFECTIVO_BASE_URL": stack.sandbox_url}
    total = len(LIMITS) * PER_MERCHANT

    code, out, shown = await on_a_terminal("reconcile", *PERIOD, **env)
    assert code == 0, shown
    assert out == f"books agree: no disagreement ({total} refunds asked about)\n"  # no bar, no escape code
    assert "reconciling" in shown and f"{total}/{total}" in shown and "━" in shown, shown
    assert "\x1b[" in shown  # drawn in place, as a terminal is
    assert "Traceback" not in shown

    await db.execute("UPDATE refunds SET state = 'failed' WHERE external_ref = 'm1-0'")
    code, out, shown = await on_a_terminal("reconcile", *PERIOD, "--json", **env)
    assert code == 1, shown
    assert [(d["kind"], d["external_ref"]) for d in json.loads(out)] == [("state", "m1-0")]  # the whole of stdout
    assert "reconciling" not in shown and shown.strip() == ""  # with --json: no bar (docs/OPERATIONS.md)


@pytest.mark.slow
async def test_a_stopped_run_resumes_where_it_stopped_and_exit_statuses_tell_findings_from_failure(
        db, settled, tmp_path, unused_tcp_port):
    stack, _ = settled
    state = tmp_path / "reconcile.state"
    env = {"PAGOEFECTIVO_BASE_URL": stack.sandbox_url}
    args = ["-m", "refundctl", "reconcile", *PERIOD, "--json", "--resume", str(state)]

    # Ctrl-C once a few refunds are checked
    process = await asyncio.create_subprocess_exec(sys.executable, *args, env={**os.environ, **env},
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    while not state.exists() or len(state.read_text().splitlines()) < 1 + 5:
        assert process.returncode is None
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = await process.communicate()
    assert process.returncode == 130, err
    done = [json.loads(line)["external_ref"] for line in state.read_text().splitlines()[1:]]
    assert 5 <= len(done) < len(LIMITS) * PER_MERCHANT

    # our books changed for one refund already checked and one not yet: only the second is asked about
    todo = next(f"{m}-{i}" for m in LIMITS for i in range(PER_MERCHANT) if f"{m}-{i}" not in done)
    await db.execute("UPDATE refunds SET state = 'failed' WHERE external_ref = ANY($1::text[])", [done[0], todo])

    code, out, err = await refundctl(*args[2:], PAGOEFECTIVO_BASE_URL=f"http://127.0.0.1:{unused_tcp_port}")
    assert code == 3 and err.startswith("refundctl: gateway unavailable") and f"--resume {state}" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err

    faults = stack.first_draws_hit(3)
    await chaos(stack.http, stack.sandbox_url, error_rate=0.2)
    code, out, err = await refundctl(*args[2:], **env)
    assert (code, err) == (1, "")  # a finding; no progress bar when stderr is not a terminal
    assert faults.hits == 0  # the three faults were met, and retried
    assert [(d["kind"], d["external_ref"], d["ours"], d["theirs"]) for d in json.loads(out)] == [
        ("state", todo, "failed", "success")]
    lines = state.read_text().splitlines()
    assert sorted(json.loads(line)["external_ref"] for line in lines[1:]) == sorted(
        f"{m}-{i}" for m in LIMITS for i in range(PER_MERCHANT))

    # all checked: the findings come from the file, the gateway is not asked
    code, out, err = await refundctl(*args[2:], PAGOEFECTIVO_BASE_URL=f"http://127.0.0.1:{unused_tcp_port}")
    assert code == 1 and [d["external_ref"] for d in json.loads(out)] == [todo], err
    code, _, err = await refundctl("reconcile", "--from", "2020-01-01", "--to", "2020-01-02", "--resume", str(state))
    assert code == 2 and "another period" in err

    await db.execute("UPDATE refunds SET state = 'succeeded'")
    code, out, err = await refundctl("reconcile", *PERIOD, "--resume", str(tmp_path / "fresh.state"), **env)
    assert code == 0 and "books agree" in out, err


def test_a_line_half_written_when_a_run_stopped_is_dropped_and_the_rest_kept(tmp_path):
    from refundctl.cli.reports import _ResumeFile

    start, stop = datetime(2026, 11, 1, tzinfo=timezone.utc), datetime(2026, 12, 1, tzinfo=timezone.utc)
    path = tmp_path / "nov.state"
    state = _ResumeFile(str(path), start, stop)
    state.close()
    finding = {"kind": "state", "merchant_id": "m1", "external_ref": "R-2", "ours": "failed", "theirs": "success"}
    last = json.dumps({"merchant_id": "m1", "external_ref": "R-2", "found": [finding]})
    with path.open("a") as out:
        out.write(json.dumps({"merchant_id": "m1", "external_ref": "R-1", "found": []}) + "\n" + last + "\n")
        out.write('{"merchant_id": "m1", "externa')  # the run stopped here
    state = _ResumeFile(str(path), start, stop)
    state.close()
    assert sorted(state.checked) == [("m1", "R-1"), ("m1", "R-2")]
    assert [d.to_json() for d in state.checked[("m1", "R-2")].found] == [finding]
    assert path.read_text().endswith("\n" + last + "\n")  # the half line gone, for the lines to come


@pytest.mark.slow
async def test_a_run_asks_about_its_environments_merchants_alone_and_says_how_many_of_the_others_it_left_out(
        db, make_merchant, database_url, redis_url, vault, monkeypatch, tmp_path):
    """A sandbox and a production merchant, each with refunds of the period: the client refuses the
    production merchant's credentials (EnvironmentMismatch), which stopped every run at its first
    production refund as "gateway unavailable" (exit 3), and --resume stopped at the same one again."""
    await make_merchant("s1")
    await make_merchant("p1", env="production")
    async with start_stack(database_url, redis_url, vault, monkeypatch) as stack:  # onboards s1 alone
        await chaos(stack.http, stack.sandbox_url, sync_status_mix={"success": 1})
        ids = [(await accepted_refund(stack, db, external_ref=f"s1-{i}", amount="1.00", merchant="s1")).refund_id
               for i in range(3)]
        await settle_all(stack.res, db, ids)
        for i, state in enumerate(("succeeded", "succeeded", "pending", "queued")):  # queued: never sent, not counted
            refund = await accepted_refund(None, db, external_ref=f"p1-{i}", amount="1.00", merchant="p1")
            await db.execute("UPDATE refunds SET state = $2 WHERE refund_id = $1", refund.refund_id, state)
        env = {"PAGOEFECTIVO_BASE_URL": stack.sandbox_url}  # PAGOEFECTIVO_ENV: sandbox, the default
        left_out = ("3 refunds of production merchants left out: this run talks to the sandbox gateway"
                    " (PAGOEFECTIVO_ENV); run it with PAGOEFECTIVO_ENV=production for them\n")
        state = tmp_path / "run.state"

        code, out, err = await refundctl("reconcile", *PERIOD, "--resume", str(state), **env)
        assert (code, err) == (0, ""), err
        assert out == "books agree: no disagreement (3 refunds asked about)\n" + left_out
        assert sorted(json.loads(line)["external_ref"] for line in state.read_text().splitlines()[1:]) == [
            "s1-0", "s1-1", "s1-2"]

        # the sandbox's ledger holds s1's refunds alone: p1's succeeded ones are not missing from it
        await db.execute("UPDATE refunds SET state = 'failed' WHERE external_ref = 's1-2'")
        code, out, err = await refundctl("reconcile", *PERIOD, "--ledger", f"{stack.sandbox_url}/sandbox/ledger",
                                         "--json", **env)
    assert code == 1, err
    assert [(d["kind"], d["external_ref"]) for d in json.loads(out)] == [("state", "s1-2")]  # stdout: the list alone
    assert err == left_out
