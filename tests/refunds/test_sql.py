"""Named statement parameters (refunds.sql) and the state machine as the only writer of states."""

from __future__ import annotations

import re

import pytest

from refunds.sql import Statement
from tests.helpers import ROOT



def test_names_are_numbered_in_order_of_first_use_and_reused():
    statement = Statement("SELECT $b::int + $a::int + $b::int, $1 AS untouched")
    assert statement.text == "SELECT $1::int + $2::int + $1::int, $1 AS untouched"
    assert statement.names == ("b", "a")
    assert statement.args(a=2, b=1) == [1, 2]


def test_a_missing_or_unknown_name_is_refused_before_anything_runs():
    statement = Statement("SELECT $amount::numeric, $currency::text")
    with pytest.raises(TypeError, match=r"missing \['currency'\], unknown \['currncy'\]"):
        statement.args(amount=1, currncy="PEN")


async def test_a_named_statement_runs_on_postgres(db):
    statement = Statement("SELECT $first::text || '-' || $second::text || '-' || $first::text AS joined")
    assert await db.fetchval(statement.text, *statement.args(second="b", first="a")) == "a-b-a"


def test_only_the_state_machine_moves_a_refund_or_writes_its_audit_rows():
    writers: dict[str, bool] = {}
    for package in ("refunds", "producers", "workers", "receiver", "refundctl", "pagoefectivo"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if AUDIT_ROW.search(text) or STATE_SET.search(text):
                writers[str(path.relative_to(ROOT))] = True
    assert set(writers) == {"refunds/states.py"}


# an INSERT of audit rows; an UPDATE of refunds whose SET list (before FROM or WHERE) assigns state
AUDIT_ROW = re.compile(r"INSERT\s+INTO\s+refund_events", re.I)
STATE_SET = re.compile(r"UPDATE\s+refunds\s+(?:\w+\s+)?SET\s+(?:(?!\bWHERE\b|\bFROM\b)[^;])*?(?<![\w.])state\s*=",
                       re.I | re.S)


def test_the_writer_patterns_find_what_they_look_for():
    assert STATE_SET.search("UPDATE refunds r SET\n updated_at = now(),\n state = m.to_state FROM x")
    assert not STATE_SET.search("UPDATE refunds SET delivered_at = x.at FROM y WHERE refund_id = x.id AND state = 'q'")
    assert not STATE_SET.search("UPDATE refunds SET next_check_at = now() WHERE refund_id = $1 AND state = 'pending'")
    assert AUDIT_ROW.search("insert into  refund_events (refund_id) values ($1)")


def test_each_program_names_its_connections_in_pg_stat_activity(database_url, tmp_path):
    """Postgres shows which service a backend serves (operators; the benchmarks' CPU per service)."""
    import subprocess
    import sys

    (tmp_path / "probe_service.py").write_text(
        "import asyncio, sys\n"
        "from refunds import db\n"
        "async def main():\n"
        "    pool = await db.create_pool(sys.argv[1], max_size=1)\n"
        "    print(await pool.fetchval(\"SELECT current_setting('application_name')\"))\n"
        "    await pool.close()\n"
        "asyncio.run(main())\n")
    run = subprocess.run([sys.executable, "-m", "probe_service", database_url], cwd=tmp_path, text=True,
                         capture_output=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "probe_service"
