"""The installed `refundctl` and `python -m workers.scheduler` as an operator's script meets them:
each expected failure one line on stderr with its documented exit status (README "Exit statuses":
0 ok, 1 findings, 2 usage or configuration, 3 a dependency unavailable), --version, --json,
quiet on a closed pipe (141), filters checked, and lists paged with --limit and --after.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import date, timedelta
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from producers import enqueue_refund
from tests.helpers import ROOT, paid

REDIS_DB = 6  # module_redis_url: the deliveries of this module's refunds stay here
SCRIPT = Path(sys.executable).with_name("refundctl")


def run(*argv: str, **env: str) -> subprocess.CompletedProcess:
    """The real refundctl in a child process (its exit status is the script's, not main()'s)."""
    return subprocess.run([str(SCRIPT), *argv], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def closed_port():
    """A local port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_database_that_does_not_exist_is_one_line_and_exit_3(database_url):
    missing = urlunsplit(urlsplit(database_url)._replace(path="/refunds_never_created"))
    done = run("db", "migrate", DATABASE_URL=missing)
    assert done.returncode == 3
    assert one_line(done.stderr) == 'refundctl: database unavailable: database "refunds_never_created" does not exist'


def test_a_database_that_is_down_is_one_line_and_exit_3(closed_port):
    done = run("refund", "list", "--json", DATABASE_URL=f"postgresql://refunds:s3cret@127.0.0.1:{closed_port}/refunds")
    assert done.returncode == 3 and done.stdout == ""
    line = one_line(done.stderr)
    assert line.startswith("refundctl: database unavailable:") and str(closed_port) in line and "s3cret" not in line


@pytest.mark.slow
def test_a_bad_setting_is_one_line_and_exit_2_for_refundctl_and_the_scheduler():
    done = run("refund", "list", INTAKE_PORT="abc")
    assert done.returncode == 2
    assert one_line(done.stderr).startswith("refundctl: INTAKE_PORT is malformed")

    scheduler = subprocess.run([sys.executable, "-m", "workers.scheduler"], env={**os.environ, "SCHEDULER_INTERVAL": "abc"},
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert scheduler.returncode == 2  # RestartPreventExitStatus=2 in deploy/systemd: not restarted in a loop
    assert "SCHEDULER_INTERVAL is malformed" in one_line(scheduler.stderr)
    # a rule between settings, refused while the workers package sets up its broker: named as the scheduler's
    scheduler = subprocess.run([sys.executable, "-m", "workers.scheduler"], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PAGOEFECTIVO_TIMEOUT_SECONDS": "30"}, cwd=ROOT)
    assert scheduler.returncode == 2 and one_line(scheduler.stderr).startswith(
        "scheduler: REFUND_CLAIM_SECONDS (20) must be at least twice PAGOEFECTIVO_TIMEOUT_SECONDS (30)"), scheduler.stderr


@pytest.mark.slow
def test_the_scheduler_runs_on_while_redis_is_down_and_stops_cleanly(closed_port):
    """Redis away is an outage the scheduler outlives (Postgres is the truth): no exit, no traceback."""
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{closed_port}/0", "SCHEDULER_INTERVAL": "0.2",
           "SCHEDULER_METRICS_PORT": "0"}
    scheduler = subprocess.Popen([sys.executable, "-m", "workers.scheduler"], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    watchdog = threading.Timer(60, scheduler.kill)  # a scheduler that never says it: the read ends
    watchdog.start()
    try:
        for line in scheduler.stderr:  # its passes go on without Redis (however slowly it started)
            seen.append(line)
            if "queue depth unavailable" in line:
                break
    finally:
        watchdog.cancel()
    assert scheduler.poll() is None, "".join(seen)
    time.sleep(1)  # a few more passes
    assert scheduler.poll() is None
    scheduler.send_signal(signal.SIGTERM)
    out, err = scheduler.communicate(timeout=30)
    err = "".join(seen) + err
    assert scheduler.returncode == 0 and "Traceback" not in err, err
    assert "queue depth unavailable" in err


@pytest.mark.slow
def test_bad_arguments_are_one_line_and_exit_2():
    done = run("refund", "list", "--state", "bogus", "--json")
    assert done.returncode == 2 and done.stdout == ""
    line = one_line(done.stderr)
    assert "'bogus'" in line and "'queued'" in line and "'manual_review'" in line
    for argv in (["refund", "list", "--limit", "0"], ["refund", "list", "--after", "no-comma"],
                 ["payment", "list", "--merchant", "not a merchant"],
                 ["report", "refunds", "--from", "2026-13-01", "--to", "2026-12-01"], ["nonsense"],
                 ["payment", "record", "--merchant", "m1", "--transaction", "T", "--amount", "1", "--currency", "PEN",
                  "--paid-at", "yesterday"],
                 ["sandbox", "onboard", "m1", "--sandbox-url", "notaurl"],  # was "unreachable", exit 3
                 ["token", "create", "--name", "a b", "--merchant", "m1"]):  # was exit 1, as a refusal
        done = run(*argv)
        assert done.returncode == 2, (argv, done.stderr)
        one_line(done.stderr)
    done = run("demo", "--refunds", "0")  # checked before any embedded server starts
    assert done.returncode == 2 and one_line(done.stderr) == "refundctl: --refunds and --merchants must be at least 1"


def test_version_is_the_installed_package_version():
    done = run("--version")
    assert (done.returncode, done.stdout) == (0, f"refundctl {version('pagoefectivo-refunds')}\n")


@pytest.mark.slow
async def test_refunds_page_with_limit_and_cursor_and_report_as_json(db, make_merchant, queue, module_redis_url):
    await make_merchant("m1")
    await paid(db)
    for n in range(5):
        await enqueue_refund(db, merchant_id="m1", original_transaction_id="CIP-1", amount="1.00", currency="PEN",
                             external_ref=f"R-{n}", reason=None, requested_by="alice")
    expected = [str(r) for r in await db.fetchval("SELECT array_agg(refund_id ORDER BY created_at, refund_id) FROM refunds")]

    pages, cursor = [], None
    while True:
        done = await asyncio.to_thread(run, "refund", "list", "--limit", "2", "--json",
                                       *(["--after", cursor] if cursor else []))
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        pages.append([r["refund_id"] for r in document["refunds"]])
        cursor = document["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sum(pages, []) == expected

    done = await asyncio.to_thread(run, "refund", "list", "--limit", "4")
    assert done.returncode == 0 and "more: add --after " in done.stdout
    done = await asyncio.to_thread(run, "refund", "list", "--state", "queued", "--json")
    assert len(json.loads(done.stdout)["refunds"]) == 5

    today = date.today()
    done = await asyncio.to_thread(run, "report", "refunds", "--from", str(today - timedelta(days=1)),
                                   "--to", str(today + timedelta(days=1)), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted(r["refund_id"] for r in report["refunds"]) == sorted(expected) and "totals" in report


@pytest.mark.slow
async def test_refund_create_with_redis_down_is_accepted_for_the_scheduler(db, make_merchant, closed_port):
    await make_merchant("m1")
    await paid(db)
    done = await asyncio.to_thread(
        run, "refund", "create", "--merchant", "m1", "--transaction", "CIP-1", "--amount", "2.00", "--currency", "PEN",
        "--external-ref", "R-REDIS-DOWN", "--json", REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["state"] == "queued"

    # without REDIS_URL at all: accepted too, and the line says why it was not delivered
    done = await asyncio.to_thread(
        run, "refund", "create", "--merchant", "m1", "--transaction", "CIP-1", "--amount", "2.00", "--currency", "PEN",
        "--external-ref", "R-NO-REDIS", "--json", REDIS_URL="")
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "queued", done.stderr
    assert "postponed: REDIS_URL is not set" in done.stderr, done.stderr


@pytest.mark.slow
async def test_a_closed_pipe_ends_quietly_with_141(db, make_merchant):
    await make_merchant("m1")
    for argv in (["merchant", "list"], ["merchant", "list", "--json"], ["--version"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first byte: every write is EPIPE
        child = subprocess.Popen([str(SCRIPT), *argv], stdout=write, stderr=subprocess.PIPE, cwd=ROOT)
        os.close(write)
        _, err = child.communicate(timeout=60)
        assert err == b"", (argv, err)
        assert child.returncode in ((0,) if argv == ["--version"] else (141,)), argv  # argparse's own exit for --version
    # and as an operator writes it, with pipefail: no "Broken pipe" line
    done = subprocess.run(["bash", "-o", "pipefail", "-c", f"'{SCRIPT}' merchant list --json | head -c 1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stderr == "" and done.returncode in (0, 141)


@pytest.fixture
async def erroring_gateway():
    """A gateway that answers every request 500."""
    from aiohttp import web

    async def boom(request):
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", boom)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


async def a_settled_refund_and_its_period(db, make_merchant) -> tuple[str, ...]:
    """m1's refund R-1 of 1.00, succeeded today; the reconcile arguments of a period around it."""
    await make_merchant("m1")
    await paid(db)
    await enqueue_refund(db, merchant_id="m1", original_transaction_id="CIP-1", amount="1.00", currency="PEN",
                         external_ref="R-1", reason=None, requested_by="alice")
    await db.execute("UPDATE refunds SET state = 'succeeded'")
    today = date.today()
    return ("--from", str(today - timedelta(days=1)), "--to", str(today + timedelta(days=1)))


@pytest.mark.slow
async def test_reconcile_tells_a_gateway_away_or_erroring_from_findings(db, make_merchant, queue, closed_port,
                                                                         erroring_gateway):
    period = await a_settled_refund_and_its_period(db, make_merchant)
    for base_url in (f"http://127.0.0.1:{closed_port}", erroring_gateway):
        done = await asyncio.to_thread(run, "reconcile", *period, "--json", PAGOEFECTIVO_BASE_URL=base_url)
        assert done.returncode == 3, (base_url, done.stderr)
        assert one_line(done.stderr).startswith("refundctl: gateway unavailable"), done.stderr


@pytest.mark.slow
async def test_merchant_add_refuses_what_the_merchants_table_would_by_option_and_writes_nothing(
        db, tmp_path, rsa_private_pem):
    (tmp_path / "secret.txt").write_text("s3cret-of-the-seller\n")
    (tmp_path / "seller.pem").write_bytes(rsa_private_pem)
    good = {"--id": "seller-1", "--env": "sandbox", "--service-id": "1234", "--access-key": "AKSELLER1",
            "--secret-key-file": str(tmp_path / "secret.txt"), "--private-key-file": str(tmp_path / "seller.pem")}

    def add(**changes: str) -> subprocess.CompletedProcess:
        options = {**good, **{f"--{name.replace('_', '-')}": value for name, value in changes.items()}}
        return run("merchant", "add", *[part for pair in options.items() for part in pair])

    refused = [  # each got past the parser before, to a traceback from the database (a CHECK, numeric(10, 2))
        ({"rate_limit": "0"}, "argument --rate-limit: the rate must be greater than 0"),
        ({"rate_limit": "0.001"}, "argument --rate-limit: the rate 0.001 has more than 2 decimals"),
        ({"rate_limit": "100000000"}, "argument --rate-limit: the rate 100000000.00 is over 99999999.99"),
        ({"approval_threshold": "0"}, "argument --approval-threshold: the threshold must be greater than 0"),
        ({"service_id": "0"}, "argument --service-id: '0' is not a positive whole number"),
        ({"id": "seller 1"}, "argument --id: 'seller 1' is not a merchant id"),
        # these went through to the gateway's refusal at onboarding or at the first authorization
        ({"access_key": ""}, "argument --access-key: must be 1-64 printable characters without spaces"),
        ({"access_key": "AK SELLER"}, "argument --access-key: must be 1-64 printable characters without spaces"),
        ({"notify_url": "notaurl"}, "argument --notify-url: 'notaurl' is not an absolute http(s) URL"),
        ({"notify_url": "ftp://seller.example/n"}, "argument --notify-url: 'ftp://seller.example/n' is not an"),
        ({"approval_threshold": "5_0"}, "argument --approval-threshold: the threshold must be a decimal string"),
    ]
    for changes, expected in refused:
        done = await asyncio.to_thread(add, **changes)
        assert done.returncode == 2 and done.stdout == "", (changes, done.stderr)
        assert expected in one_line(done.stderr), (changes, done.stderr)
    assert await db.fetchval("SELECT count(*) FROM merchants") == 0

    done = await asyncio.to_thread(add, rate_limit="0.5", approval_threshold="250.00",  # the same files: accepted
                                   notify_url="https://seller.example/pagoefectivo/notify")
    assert done.returncode == 0, done.stderr
    assert (await db.fetchrow("SELECT rate_limit, approval_threshold FROM merchants WHERE merchant_id = 'seller-1'")
            ) == (Decimal("0.50"), Decimal("250.00"))


async def test_a_check_violation_the_arguments_let_through_is_one_line_naming_the_constraint_and_exit_2(
        db, vault, capsys, rsa_private_pem):
    from pagoefectivo.protocol import public_key_pem
    from refunds import service
    from refunds.merchants import add_merchant

    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await add_merchant(db, vault, merchant_id="m1", env="sandbox", service_id=1, access_key="AK",
                           secret_key="s3cret-of-m1", private_key_pem=rsa_private_pem,
                           public_key_pem=public_key_pem(rsa_private_pem), rate_limit=Decimal("0.004"))

    def body():
        raise refused.value

    assert service.guarded("refundctl", body) == 2
    line = one_line(capsys.readouterr().err)
    assert line == ('refundctl: database refused a value: new row for relation "merchants" violates check constraint'
                    ' "merchants_rate_limit_check"')


async def test_a_payment_of_a_merchant_that_does_not_exist_is_one_line_naming_it_and_exit_2(db, make_merchant):
    """The payments row refers to its merchant (a foreign key): the database's refusal is one line
    from the table and the constraint, never the DETAIL with the key's values, nor a traceback."""
    await make_merchant("m1")
    done = await asyncio.to_thread(run, "payment", "record", "--merchant", "nosuch", "--transaction", "T-1",
                                   "--amount", "1.00", "--currency", "PEN")
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert one_line(done.stderr) == ('refundctl: database refused a value: the merchant_id given for payments does not'
                                     ' exist (foreign key constraint "payments_merchant_id_fkey")')
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


@pytest.mark.slow
async def test_a_limit_or_an_overlap_out_of_bounds_is_refused_by_the_parser_and_nothing_changes(db, make_merchant,
                                                                                                vault, tmp_path):
    """deliveries --limit reaches SQL's LIMIT, --overlap-hours a timestamp: each out of its bounds was a
    traceback from Postgres or the driver; now the parser's one line (exit 2), before anything is read."""
    from refunds.webhooks import add_endpoint

    await make_merchant("m1")
    endpoint, _ = await add_endpoint(db, vault, name="orders", url="https://hooks.example.com/refunds",
                                     merchants=["m1"], event_types=["refund.failed"])
    (tmp_path / "secret.txt").write_text("the-new-secret-of-m1\n")
    rotate_endpoint = ["webhooks", "rotate-secret", str(endpoint.endpoint_id), "--overlap-hours"]
    rotate_merchant = ["merchant", "rotate-secret", "--id", "m1", "--secret-key-file", str(tmp_path / "secret.txt"),
                       "--overlap-hours"]
    refused = [
        (["webhooks", "deliveries", "--limit", "-1"], "argument --limit: '-1' is not a positive whole number"),
        (["webhooks", "deliveries", "--limit", "0"], "argument --limit: '0' is not a positive whole number"),
        (["webhooks", "deliveries", "--limit", "10001"], "argument --limit: '10001' is over 10000"),
        ([*rotate_endpoint, "1e9"], "argument --overlap-hours: '1e9' is not a number of hours from 0 to 168"),
        ([*rotate_endpoint, "-1"], "argument --overlap-hours: '-1' is not a number of hours from 0 to 168"),
        ([*rotate_endpoint, "nan"], "argument --overlap-hours: 'nan' is not a number of hours from 0 to 168"),
        ([*rotate_merchant, "1e9"], "argument --overlap-hours: '1e9' is not a number of hours from 0 to 720"),
        ([*rotate_merchant, "inf"], "argument --overlap-hours: 'inf' is not a number of hours from 0 to 720"),
    ]
    for argv, expected in refused:
        done = await asyncio.to_thread(run, *argv)
        assert done.returncode == 2 and done.stdout == "", (argv, done.stderr)
        assert expected in one_line(done.stderr), (argv, done.stderr)
    assert await db.fetchval("SELECT previous_secret_valid_until FROM webhook_endpoints") is None
    assert await db.fetchval("SELECT previous_secret_valid_until FROM merchants") is None

    # the bounds themselves are accepted
    for argv in (["webhooks", "deliveries", "--limit", "10000", "--json"], [*rotate_endpoint, "168", "--json"],
                 [*rotate_merchant, "720", "--json"]):
        done = await asyncio.to_thread(run, *argv)
        assert done.returncode == 0, (argv, done.stderr)
    assert await db.fetchval("SELECT previous_secret_valid_until - now() > interval '167 hours'"
                             " FROM webhook_endpoints")
    assert await db.fetchval("SELECT previous_secret_valid_until - now() > interval '719 hours' FROM merchants")


@pytest.mark.slow
async def test_a_malformed_ledger_is_named_by_file_and_entry_before_the_run_starts(db, make_merchant, queue, tmp_path,
                                                                                  closed_port):
    """Each was a KeyError, TypeError or InvalidOperation once every refund had been asked about, and
    the disagreements found were lost; now one line and exit 2 before the gateway is asked anything
    (it is away here: a run that started would end with exit 3)."""
    period = await a_settled_refund_and_its_period(db, make_merchant)
    entry = {"merchantId": "m1", "externalRef": "R-1", "refundAmount": "1.00", "currency": "PEN"}
    path = tmp_path / "ledger.json"
    cases = [
        ({"refunds": [entry]}, "not a list of executed refunds: the document is an object"),
        ([entry, {k: v for k, v in entry.items() if k != "merchantId"}], "entry 1 (counting from 0): merchantId is missing"),
        ([entry, entry, {**entry, "refundAmount": None}], "entry 2 (counting from 0): refundAmount is missing"),
        ([{**entry, "refundAmount": "1,00"}], "entry 0 (counting from 0): refundAmount '1,00' is not an amount"),
        ([entry, "R-2"], "entry 1 (counting from 0): a string, not an object"),
    ]
    for document, problem in cases:
        path.write_text(json.dumps(document))
        done = await asyncio.to_thread(run, "reconcile", *period, "--ledger", str(path), "--json",
                                       PAGOEFECTIVO_BASE_URL=f"http://127.0.0.1:{closed_port}")
        assert done.returncode == 2 and done.stdout == "", (document, done.stderr)
        assert one_line(done.stderr) == f"refundctl: --ledger {path}: {problem}", document


@pytest.mark.slow
async def test_a_malformed_setting_or_a_value_out_of_range_is_one_line_and_exit_2_and_nothing_is_written(
        db, make_merchant):
    await make_merchant("m1")
    record = ["payment", "record", "--merchant", "m1", "--transaction", "T-1", "--currency", "PEN"]
    cases = [
        (["refund", "list"], {"DATABASE_URL": "notaurl"}, "refundctl: DATABASE_URL is malformed: "),
        (["refund", "list"], {"REFUND_WINDOW_DAYS": "garbage"}, "refundctl: REFUND_WINDOW_DAYS is malformed: not valid JSON"),
        (["refund", "list"], {"REFUND_WINDOW_DAYS": '{"cash": -5}'}, "refundctl: REFUND_WINDOW_DAYS is malformed: "),
        ([*record, "--amount", "1e3"], {}, 'refundctl: --amount: amount must be a decimal string with at most 2 decimals'),
        ([*record, "--amount", "-3"], {}, "refundctl: --amount: amount must be greater than 0"),
        ([*record, "--amount", "1.00", "--paid-at", "0001-01-01T00:00:00+14:00"], {},
         "refundctl: database refused a value: "),
        (["report", "refunds", "--from", "2026-01-01", "--to", "9999-12-31"], {}, "refundctl: a value is out of range: "),
    ]
    for argv, env, start in cases:
        done = await asyncio.to_thread(run, *argv, **env)
        assert done.returncode == 2 and done.stdout == "", (argv, env, done.stderr)
        assert one_line(done.stderr).startswith(start), (argv, env, done.stderr)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


@pytest.mark.slow
async def test_payment_record_checks_as_payment_import_does_and_a_conflict_is_not_success(db, make_merchant):
    await make_merchant("m1")
    record = ["payment", "record", "--merchant", "m1", "--currency", "PEN"]
    for argv, start in [
        ([*record, "--transaction", "", "--amount", "5.00"], "refundctl: --transaction: transaction_id is empty"),
        ([*record, "--transaction", "T" * 65, "--amount", "5.00"], "refundctl: --transaction: transaction_id must be"),
        ([*record, "--transaction", "T-1", "--amount", "5.00", "--paid-at", "2099-01-01T10:00:00-05:00"],
         "refundctl: --paid-at: paid_at is in the future"),
    ]:
        done = await asyncio.to_thread(run, *argv)
        assert done.returncode == 2 and done.stdout == "", (argv, done.stderr)
        assert one_line(done.stderr).startswith(start), (argv, done.stderr)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0

    done = await asyncio.to_thread(run, *record, "--transaction", "T-1", "--amount", "100.00")
    assert done.returncode == 0 and done.stdout == "payment T-1 recorded: 100.00 PEN\n", done.stderr
    done = await asyncio.to_thread(run, *record, "--transaction", "T-1", "--amount", "100.00")
    assert done.returncode == 0 and done.stdout == "payment T-1 already recorded: 100.00 PEN\n", done.stderr
    done = await asyncio.to_thread(run, *record, "--transaction", "T-1", "--amount", "50.00")
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert one_line(done.stderr) == ("refundctl: payment T-1 is already recorded with 100.00 PEN, not 50.00 PEN;"
                                     " nothing was changed")
    assert await db.fetchval("SELECT amount FROM payments WHERE transaction_id = 'T-1'") == Decimal("100.00")


async def test_replaying_an_event_id_with_no_delivery_is_a_finding_not_nothing_to_do(db):
    done = await asyncio.to_thread(run, "webhooks", "replay", "--event", "evt_nope")
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert one_line(done.stderr) == "refundctl: no delivery of event 'evt_nope' to replay"
