"""refundctl token list|revoke, refund approve|reject|retry and keys rotate-master, against real Postgres and Redis.

The commands run in-process (``refundctl.cli.main`` in a worker thread, so that its
``asyncio.run`` has a thread of its own) with stdout and stderr captured; one test runs
the installed ``refundctl`` script itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from refundctl.cli import main
from refunds.payments import find_payment
from refunds.states import transition
from refunds.tokens import authenticate, create_token
from tests.helpers import paid

REDIS_DB = 13  # module_redis_url: a Redis database of our own


def queued(client) -> list[str]:
    return [json.loads(raw)["args"][0] for raw in client.hgetall("dramatiq:refunds.msgs").values()]


@pytest.fixture
def refundctl(capsys, queue):
    """Run one refundctl command; returns (exit status, stdout, stderr)."""

    async def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = await asyncio.to_thread(main, list(argv))
        except SystemExit as exit_:  # the parser's refusal: exit 2, as the script ends
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run



async def create(refundctl, external_ref: str, amount: str = "10.00", requested_by: str = "alice") -> dict:
    code, out, err = await refundctl(
        "refund", "create", "--merchant", "m1", "--transaction", "CIP-1", "--amount", amount, "--currency", "PEN",
        "--external-ref", external_ref, "--requested-by", requested_by, "--json")
    assert code == 0, err
    return json.loads(out)


# --- tokens ----------------------------------------------------------------------------------

async def test_token_list_shows_names_and_scopes_never_secrets_and_revoke_acts_at_once(db, make_merchant, refundctl):
    await make_merchant("m1")
    await make_merchant("m2")
    alice = await create_token(db, "alice", ["m1"])
    await create_token(db, "bob", ["m1", "m2"])

    code, out, _ = await refundctl("token", "list", "--json")
    assert code == 0
    listed = json.loads(out)["tokens"]
    assert [(t["name"], t["merchants"], t["active"]) for t in listed] == [("alice", ["m1"], True),
                                                                         ("bob", ["m1", "m2"], True)]
    assert alice not in out and "hash" not in out
    code, out, _ = await refundctl("token", "list")
    assert code == 0 and "alice" in out and "m1, m2" in out and alice not in out

    code, out, _ = await refundctl("token", "revoke", "alice")
    assert code == 0 and "token alice revoked" in out
    assert await authenticate(db, alice) is None
    listed = json.loads((await refundctl("token", "list", "--json"))[1])["tokens"]
    assert listed[0]["name"] == "alice" and not listed[0]["active"] and listed[0]["revoked_at"]
    code, _, err = await refundctl("token", "revoke", "alice")
    assert code == 1 and "no active token named 'alice'" in err


# --- approvals ---------------------------------------------------------------------------------

async def test_approve_and_reject_follow_the_four_eyes_rule(db, make_merchant, refundctl, queue):
    await make_merchant("m1", refund_mode="approval")
    await paid(db)
    first = await create(refundctl, "R-1")
    second = await create(refundctl, "R-2", amount="30.00")
    assert first["state"] == second["state"] == "awaiting_approval"
    assert queued(queue) == []

    for same in ("alice", "ALICE"):
        code, _, err = await refundctl("refund", "approve", "R-1", "--by", same)
        assert code == 1 and "requested this refund and cannot also approve it" in err, err
    code, _, err = await refundctl("refund", "approve", "R-1", "--by", "bad name!")
    assert code == 2 and "--by" in err
    assert await db.fetchval("SELECT state FROM refunds WHERE external_ref = 'R-1'") == "awaiting_approval"

    code, out, err = await refundctl("refund", "approve", "R-1", "--by", "bob", "--message", "checked", "--json")
    assert code == 0, err
    approved = json.loads(out)
    assert approved["state"] == "queued"
    assert (approved["events"][-1]["actor"], approved["events"][-1]["message"]) == ("approver:bob", "approved by bob: checked")
    assert queued(queue) == [first["refund_id"]]
    code, _, err = await refundctl("refund", "approve", first["refund_id"], "--by", "carol")
    assert code == 1 and "not awaiting approval" in err

    code, out, err = await refundctl("refund", "reject", second["refund_id"], "--by", "bob")
    assert code == 0 and "rejected by bob: rejected" in out, err
    events = await db.fetch("SELECT actor, to_state FROM refund_events WHERE refund_id = $1 ORDER BY event_id",
                            await db.fetchval("SELECT refund_id FROM refunds WHERE external_ref = 'R-2'"))
    assert [(e["actor"], e["to_state"]) for e in events] == [("alice", "awaiting_approval"), ("approver:bob", "rejected")]
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("10.00")  # R-2's 30.00 released
    assert queued(queue) == [first["refund_id"]]
    code, _, err = await refundctl("refund", "reject", "R-404", "--by", "bob")
    assert code == 1 and "no refund with id or external ref 'R-404'" in err


async def test_the_api_and_the_command_share_one_approval_rule(db, make_merchant, refundctl):
    """A refund asked for over HTTP by token 'alice' cannot be approved by an operator calling himself alice."""
    from aiohttp.test_utils import TestClient, TestServer

    from producers.http import create_app

    await make_merchant("m1", approval_threshold=Decimal("5.00"))
    await paid(db)
    token = await create_token(db, "alice", ["m1"])
    async with TestClient(TestServer(create_app(database_url=os.environ["DATABASE_URL"]))) as http:
        response = await http.post("/v1/refunds", headers={"Authorization": f"Bearer {token}"}, json={
            "merchant_id": "m1", "original_transaction_id": "CIP-1", "amount": "9.00", "currency": "PEN",
            "external_ref": "API-1"})
        assert response.status == 202 and (await response.json())["state"] == "awaiting_approval"
    code, _, err = await refundctl("refund", "approve", "API-1", "--by", "alice")
    assert code == 1 and "cannot also approve" in err
    code, _, err = await refundctl("refund", "approve", "API-1", "--by", "ops:bob")
    assert code == 0, err


# --- retry -------------------------------------------------------------------------------------

async def test_retry_queues_again_audits_the_operator_and_delivers(db, make_merchant, refundctl, queue):
    await make_merchant("m1")
    await paid(db)
    refund = await create(refundctl, "R-1", requested_by="refundctl")
    assert queued(queue) == [refund["refund_id"]]
    queue.flushdb()
    code, _, err = await refundctl("refund", "retry", "R-1")
    assert code == 1 and "only a refund in manual_review or failed can be retried" in err

    refund_id = (await db.fetchval("SELECT refund_id FROM refunds"))
    await transition(db, refund_id, "submitted", actor="worker")
    await transition(db, refund_id, "manual_review", actor="worker", code="timeout")
    code, out, err = await refundctl("refund", "retry", "R-1", "--by", "ops-carol", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["state"] == "queued"
    assert (shown["events"][-1]["from_state"], shown["events"][-1]["actor"]) == ("manual_review", "operator:ops-carol")
    assert queued(queue) == [refund["refund_id"]]  # delivered again, after the commit

    await transition(db, refund_id, "submitted", actor="worker")
    await transition(db, refund_id, "failed", actor="worker", code="605")
    code, _, err = await refundctl("refund", "retry", refund["refund_id"])
    assert code == 1 and "605" in err


async def test_show_resolves_an_external_ref(db, make_merchant, refundctl):
    await make_merchant("m1")
    await paid(db)
    refund = await create(refundctl, "R-9")
    code, out, _ = await refundctl("refund", "show", "R-9", "--json")
    assert code == 0 and json.loads(out)["refund_id"] == refund["refund_id"]


# --- master-key rotation -------------------------------------------------------------------------

async def test_keys_rotate_master_rewraps_merchant_and_webhook_secrets_and_says_how_many(
        db, vault, make_merchant, refundctl, monkeypatch):
    """The documented rotation: the new key current, the old one previous, `keys rotate-master`,
    then the old key dropped: the merchants' secrets and the webhook endpoints' still open."""
    import base64
    from datetime import timedelta

    from refunds import webhooks
    from refunds.errors import VaultError
    from refunds.merchants import find_merchant
    from refunds.settings import get_settings
    from refunds.vault import Vault, generate_master_key

    await make_merchant("m1", secret_key="merchant-secret")
    await make_merchant("m2", secret_key="merchant-secret-2")
    endpoint, first = await webhooks.add_endpoint(db, vault, name="orders", url="https://hooks.example.com/refunds",
                                                  merchants=["m1"], event_types=["refund.succeeded"])
    _, second = await webhooks.rotate_secret(db, vault, endpoint.endpoint_id, overlap=timedelta(hours=1))
    new_key = generate_master_key()
    try:
        with monkeypatch.context() as env:
            env.setenv("REFUNDS_PREVIOUS_MASTER_KEYS", os.environ["REFUNDS_MASTER_KEY"])
            env.setenv("REFUNDS_MASTER_KEY", new_key)
            env.delenv("REFUNDS_MASTER_KEY_FILE", raising=False)
            get_settings.cache_clear()
            code, out, err = await refundctl("keys", "rotate-master", "--json")
            assert code == 0, err
            assert json.loads(out) == {"merchants_rewrapped": 2, "webhook_endpoints_rewrapped": 1}
            code, out, err = await refundctl("keys", "rotate-master")
            assert code == 0, err
            assert out.strip() == ("re-wrapped the data keys of 2 merchants and 1 webhook endpoints"
                                   " with the current master key")
    finally:
        get_settings.cache_clear()  # the session's settings again

    after = Vault(base64.b64decode(new_key))  # the old key dropped
    assert (await find_merchant(db, "m1")).secret_key(after) == "merchant-secret"
    assert (await find_merchant(db, "m2")).secret_key(after) == "merchant-secret-2"
    assert (await webhooks.get_endpoint(db, endpoint.endpoint_id)).secrets(after) == [second, first]
    with pytest.raises(VaultError):
        (await webhooks.get_endpoint(db, endpoint.endpoint_id)).secrets(vault)


# --- the installed script ----------------------------------------------------------------------

async def test_the_refundctl_script(db, make_merchant, database_url, module_redis_url):
    await make_merchant("m1")
    await create_token(db, "svc-checkout", ["m1"])
    script = Path(sys.executable).with_name("refundctl")
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": module_redis_url}
    done = await asyncio.to_thread(subprocess.run, [str(script), "token", "list", "--json"], env=env,
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [t["name"] for t in json.loads(done.stdout)["tokens"]] == ["svc-checkout"]


async def test_caller_text_reaches_the_terminal_escaped_never_as_sequences_or_markup(db, make_merchant, refundctl):
    """A reason carrying an OSC hyperlink and an ANSI colour, and an audit message that looks like
    Rich markup: `refund show` prints both as text, its exit status 0."""
    await make_merchant("m1")
    await paid(db)
    refund = await create(refundctl, "R-ESC")
    hostile = "\x1b]8;;https://evil.example\x07click\x1b]8;;\x07 \x1b[31mred\x1b[0m\r\nforged: line"
    await db.execute("UPDATE refunds SET reason = $2 WHERE refund_id = $1::uuid", refund["refund_id"], hostile)
    await db.execute("UPDATE refund_events SET message = '[/oops] [bold]x' WHERE refund_id = $1::uuid",
                     refund["refund_id"])
    code, out, err = await refundctl("refund", "show", "R-ESC")
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b]8;;https://evil.example\\x07click" in out and "\\x0d\\x0aforged: line" in out
    assert "[/oops] [bold]x" in out


# --- webhooks --------------------------------------------------------------------------------------

async def test_webhooks_add_with_a_malformed_url_is_one_line_and_exit_2(db, make_merchant, capsys):
    """--url takes the intake's rule for webhook URLs (refunds.requests): one of the http(s) shape that
    cannot be parsed ("http://[::1") is one line naming --url and exit 2, like any bad argument, and
    adds nothing; a good one is added, without an owner (an operator's endpoint)."""
    await make_merchant("m1")

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse refuses an argument by exiting, in the script as here
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    for url in ("http://[::1", "https://hooks.example.com:99999/refunds", "ftp://hooks.example.com/refunds"):
        code, out, err = await asyncio.to_thread(
            run, "webhooks", "add", "--name", "checkout", "--url", url, "--merchant", "m1")
        assert (code, out) == (2, ""), (url, err)
        assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("refundctl webhooks add: argument --url: ") and repr(url) in err, err
    assert await db.fetchval("SELECT count(*) FROM webhook_endpoints") == 0

    code, out, err = await asyncio.to_thread(
        run, "webhooks", "add", "--name", "checkout", "--url", "https://hooks.example.com/refunds", "--merchant", "m1",
        "--json")
    assert code == 0, err
    added = json.loads(out)
    code, out, err = await asyncio.to_thread(run, "webhooks", "list", "--json")
    assert code == 0, err
    assert [(e["endpoint_id"], e["owner"]) for e in json.loads(out)["endpoints"]] == [(added["endpoint_id"], None)]


def test_the_top_level_help_describes_every_command():
    import argparse

    from refundctl.cli import build_parser

    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    described = {choice.dest for choice in commands._choices_actions if choice.help}
    assert described == set(commands.choices), sorted(set(commands.choices) - described)
