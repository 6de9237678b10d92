"""refundctl webhooks: calling services' endpoints, their deliveries, replays (docs/WEBHOOKS.md).

An endpoint's signing secret is printed once, at ``add`` and ``rotate-secret``; only its
sealed form is kept. Every endpoint is managed here. One added here has no owner: the intake
never shows it to a calling service; one a service registered through the intake is that
service's (``owner``, its token's name), which alone manages it there.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from uuid import UUID

from .common import NotFound, Usage, emit, hours, positive_up_to, settings, table, vault, with_conn, with_json

MAX_OVERLAP_HOURS = 168  # the API's bound on a rotation's overlap_hours (refunds.requests.WebhookRotation)
MAX_DELIVERIES = 10_000  # rows `deliveries` lists at most


def _endpoint_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise Usage(f"{text!r} is not an endpoint id (a UUID: refundctl webhooks list)") from None


def _url(text: str) -> str:
    """--url: the rule of the intake's webhook requests (refunds.requests), so a malformed one is one line, exit 2."""
    import argparse

    from refunds.errors import RefundRefused
    from refunds.requests import webhook_url

    try:
        return webhook_url(text, "the url")
    except RefundRefused as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.message}") from None


def _moment(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise Usage(f"{name} must be ISO-8601 with its offset, e.g. 2026-12-01T00:00:00-05:00")
    return moment


def cmd_add(args) -> int:
    from refunds.webhooks import EVENT_TYPES, add_endpoint, parse_networks

    allowed = parse_networks(settings().webhook_allowed_networks)
    endpoint, secret = asyncio.run(with_conn(lambda conn: add_endpoint(
        conn, vault(), name=args.name, url=args.url, merchants=args.merchant,
        event_types=args.event or list(EVENT_TYPES),
        allowed_networks=allowed)))
    emit(args, {**endpoint.to_json(), "secret": secret}, lambda: print(
        f"endpoint {endpoint.endpoint_id} ({endpoint.name}) added; its signing secret, shown once:\n{secret}"))
    return 0


def cmd_list(args) -> int:
    from refunds.webhooks import list_endpoints

    # owner: the intake token that made it and manages it through the intake; null: an operator's (refundctl)
    views = [{**e.to_json(), "owner": e.owner} for e in asyncio.run(with_conn(list_endpoints))]
    emit(args, {"endpoints": views}, lambda: table(
        "webhook endpoints", ["endpoint", "name", "owner", "url", "merchants", "events", "disabled"],
        [[v["endpoint_id"], v["name"], v["owner"] or "(refundctl)", v["url"], ", ".join(v["merchants"]),
          ", ".join(v["event_types"]), v["disabled_at"] or ""] for v in views]))
    return 0


def cmd_disable(args) -> int:
    from refunds.webhooks import disable_endpoint

    endpoint = asyncio.run(with_conn(lambda conn: disable_endpoint(conn, _endpoint_id(args.endpoint))))
    emit(args, endpoint.to_json(), lambda: print(f"endpoint {endpoint.endpoint_id} disabled"))
    return 0


def cmd_rotate(args) -> int:
    from refunds.webhooks import rotate_secret

    endpoint, secret = asyncio.run(with_conn(lambda conn: rotate_secret(
        conn, vault(), _endpoint_id(args.endpoint), overlap=timedelta(hours=args.overlap_hours))))
    emit(args, {**endpoint.to_json(), "secret": secret}, lambda: print(
        f"new signing secret of {endpoint.endpoint_id}, shown once (the old one signs too until"
        f" {endpoint.previous_secret_valid_until.isoformat()}):\n{secret}"))
    return 0


def cmd_deliveries(args) -> int:
    from refunds.webhooks import list_deliveries

    endpoint_id = _endpoint_id(args.endpoint) if args.endpoint else None
    rows = asyncio.run(with_conn(lambda conn: list_deliveries(conn, endpoint_id=endpoint_id, state=args.state,
                                                             limit=args.limit)))
    emit(args, {"deliveries": rows}, lambda: table(
        "webhook deliveries (newest first)", ["event", "type", "endpoint", "state", "attempts", "last", "next"],
        [[r["event_id"], r["event_type"], r["endpoint_id"], r["state"], r["attempts"],
          r["last_error"] or (r["last_status"] or ""), r["next_attempt_at"] if r["state"] == "pending" else ""]
         for r in rows]))
    return 0


def cmd_replay(args) -> int:
    from refunds.webhooks import replay

    since, until = _moment(args.since, "--from"), _moment(args.until, "--to")
    if not (args.event or since):
        raise Usage("name an event (--event) or a time range (--from [--to]) to replay")
    endpoint_id = _endpoint_id(args.endpoint) if args.endpoint else None
    count = asyncio.run(with_conn(lambda conn: replay(conn, event_id=args.event, since=since, until=until,
                                                      endpoint_id=endpoint_id)))
    if args.event and not count:  # an id mistyped is not "nothing to do"
        raise NotFound(f"no delivery of event {args.event!r}{' to that endpoint' if endpoint_id else ''} to replay")
    emit(args, {"replayed": count}, lambda: print(f"{count} deliveries due again (same event ids)"))
    return 0


def register(sub) -> None:
    from refunds.webhooks import EVENT_TYPES

    hooks = sub.add_parser("webhooks", help="calling services' webhook endpoints (docs/WEBHOOKS.md)")
    commands = hooks.add_subparsers(dest="webhooks_command", required=True)
    add = with_json(commands.add_parser("add", help="a calling service's endpoint; prints its secret once"))
    add.add_argument("--name", required=True, help="the calling service")
    add.add_argument("--url", required=True, type=_url,
                     help="https://... (private addresses only if WEBHOOK_ALLOWED_NETWORKS)")
    add.add_argument("--merchant", required=True, action="append", help="a merchant whose events it receives")
    add.add_argument("--event", action="append", choices=EVENT_TYPES, default=None,
                     help="an event type it wants (default: all)")
    add.set_defaults(func=cmd_add)
    with_json(commands.add_parser("list", help="every endpoint (never a secret)")).set_defaults(func=cmd_list)
    disable = with_json(commands.add_parser("disable", help="no more events; undelivered ones fail"))
    disable.add_argument("endpoint")
    disable.set_defaults(func=cmd_disable)
    rotate = with_json(commands.add_parser("rotate-secret", help="a new secret; the old one signs too for a while"))
    rotate.add_argument("endpoint")
    rotate.add_argument("--overlap-hours", type=hours(MAX_OVERLAP_HOURS), default=24.0,
                        help=f"how long the old secret signs beside the new one: 0 to {MAX_OVERLAP_HOURS} (default 24)")
    rotate.set_defaults(func=cmd_rotate)
    deliveries = with_json(commands.add_parser("deliveries", help="deliveries and their last attempt"))
    deliveries.add_argument("--endpoint", default=None)
    deliveries.add_argument("--state", choices=("pending", "sending", "delivered", "failed"), default=None)
    deliveries.add_argument("--limit", type=positive_up_to(MAX_DELIVERIES), default=100,
                            help=f"rows at most, newest first: 1 to {MAX_DELIVERIES} (default 100)")
    deliveries.set_defaults(func=cmd_deliveries)
    replay = with_json(commands.add_parser("replay", help="deliver one event, or a time range's, again"))
    replay.add_argument("--event", default=None, help="an event id (evt_...)")
    replay.add_argument("--from", dest="since", default=None, help="events from this moment (ISO-8601)")
    replay.add_argument("--to", dest="until", default=None, help="... until this one (default: now)")
    replay.add_argument("--endpoint", default=None, help="to this endpoint only")
    replay.set_defaults(func=cmd_replay)
