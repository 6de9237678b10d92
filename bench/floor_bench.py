"""The least CPU a refund can cost on this machine, against the budget of the end-to-end goal.

    .venv/bin/python bench/floor_bench.py                  # 20,000 HTTP requests, 2,000 RSA operations, ~1 minute
    .venv/bin/python bench/floor_bench.py --smoke          # a tiny run (CI smoke test)

The end-to-end goal (``e2e_bench.py``: refunds/s ≥ 0.30 × dramatiq's no-op messages/s) is a
CPU budget: every process of the system shares this machine's cores, so a refund may cost
at most ``cores ÷ (0.30 × no-op messages/s)`` CPU seconds in all. This benchmark measures, in
the same run, the baseline that sets the budget and the work that the protocol makes
unavoidable for every refund, each on its own with nothing else of the system around it:

* three HTTP requests over loopback, each a JSON body of a refund's size answered with a
  small JSON: intake ← producer, gateway ← worker, notify_url ← gateway. Each is measured as
  an aiohttp server on uvloop (server process CPU, no access log) plus, for the two that our
  own services send, an aiohttp client on uvloop (client process CPU); the producer's client
  is left out;
* one RSA-2048 PKCS#1 v1.5 SHA-256 signature (the worker signs each request) and one
  verification (the gateway checks it).

Left out, so the floor is below the truth: Postgres (every refund is inserted, moved three
times and audited), Redis and dramatiq, JSON validation, the state machine, logs and metrics.

Printed last: the budget, each part of the floor, the floor, and what the budget leaves for
everything left out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h

GOAL_RATIO = 0.30
HOPS_SERVED = 3  # intake, gateway, notify_url
HOPS_SENT_BY_US = 2  # worker -> gateway, gateway -> receiver (the producer's client is not counted)
REFUND_BODY = {  # the size and shape of a signed refund request
    "merchantId": "floor-01", "originalTransactionId": "CIP-000123456", "refundAmount": "42.50", "currency": "PEN",
    "refundReason": "customer returned the item", "externalRef": "R-floor-000123456",
    "notifyUrl": "http://127.0.0.1:8082/pagoefectivo/notifications/floor-01", "timestamp": "2026-11-26T09:00:00-05:00",
    "signature": "A" * 344,
}
ANSWER = {"code": "100", "message": "Solicitud exitosa.", "data": {
    "refundId": "RF-000123456", "externalRef": "R-floor-000123456", "status": "pending", "refundAmount": "42.50",
    "currency": "PEN"}}


def serve(port: int) -> int:
    """The server side of one HTTP hop: read the JSON body, answer a small JSON."""
    from aiohttp import web

    from refunds.service import run

    async def handle(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.json_response(ANSWER)

    app = web.Application()
    app.router.add_post("/hop", handle)
    return run("floor-hop", app, "127.0.0.1", port, access_log=None)


async def _post_all(url: str, count: int, connections: int) -> None:
    import aiohttp

    body = json.dumps(REFUND_BODY).encode()
    left = iter(range(count))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def one_connection() -> None:
            for _ in left:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                    json.loads(await response.read())
                    assert response.status == 200, response.status

        await asyncio.gather(*(one_connection() for _ in range(connections)))


def http_hop(count: int, connections: int, work: Path) -> dict:
    """CPU seconds of the server process and of this (client) process for ``count`` requests."""
    import uvloop

    from refundctl.processes import free_port

    port = free_port()
    log = (work / "hop-server.log").open("w")
    server = subprocess.Popen([sys.executable, __file__, "_server", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/hop"
        deadline = time.monotonic() + 30
        while "listening" not in (work / "hop-server.log").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the hop server did not start: " + (work / "hop-server.log").read_text())
            time.sleep(0.05)
        uvloop.run(_post_all(url, min(1000, count), connections))  # warm-up
        server_cpu, client_cpu, started = h.tree_cpu(server.pid), time.process_time(), time.perf_counter()
        uvloop.run(_post_all(url, count, connections))
        elapsed = time.perf_counter() - started
        server_cpu, client_cpu = h.tree_cpu(server.pid) - server_cpu, time.process_time() - client_cpu
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    return {"requests": count, "seconds": elapsed, "server_ms": 1000 * server_cpu / count,
            "client_ms": 1000 * client_cpu / count}


def rsa(count: int) -> dict:
    """CPU milliseconds of one RSA-2048 signature and one verification, as the protocol makes them."""
    from pagoefectivo import protocol
    from cryptography.hazmat.primitives import serialization

    key = protocol.load_private_key(h.new_private_pem())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    fields = {k: v for k, v in REFUND_BODY.items() if k != "signature"}
    started = time.process_time()
    signatures = [protocol.sign_fields(fields, key) for _ in range(count)]
    signed = time.process_time()
    assert all(protocol.verify_fields(fields, signature, public_pem) for signature in signatures)
    verified = time.process_time()
    return {"operations": count, "sign_ms": 1000 * (signed - started) / count,
            "verify_ms": 1000 * (verified - signed) / count}


def run(args) -> dict:
    figures = {"machine": h.machine(), "load_before": h.load_average(), "cores": os.cpu_count(), "args": vars(args)}
    with h.environment("floor") as env:
        figures["services"] = env.services_text
        baselines = [h.noop_baseline_of(env, args, "before")]
        h.log(f"HTTP hop: {args.requests} requests over {args.connections} connections")
        figures["http"] = http_hop(args.requests, args.connections, env.work)
        h.log(f"RSA-2048: {args.rsa} signatures and verifications")
        figures["rsa"] = rsa(args.rsa)
        baselines.append(h.noop_baseline_of(env, args, "after"))
    noop = sum(b["per_second"] for b in baselines) / len(baselines)
    http, signing = figures["http"], figures["rsa"]
    parts = {
        f"{HOPS_SERVED} HTTP requests served": HOPS_SERVED * http["server_ms"],
        f"{HOPS_SENT_BY_US} HTTP requests sent": HOPS_SENT_BY_US * http["client_ms"],
        "RSA signature": signing["sign_ms"],
        "RSA verification": signing["verify_ms"],
    }
    budget = 1000 * figures["cores"] / (GOAL_RATIO * noop)
    figures.update({"load_after": h.load_average(), "baselines": baselines, "noop_per_s": noop,
                    "budget_ms": budget, "floor_parts_ms": parts, "floor_ms": sum(parts.values())})
    return figures


def report(f: dict) -> None:
    h.print_report_header(f)
    http, signing = f["http"], f["rsa"]
    print(f"HTTP hop (aiohttp on uvloop, {f['args']['connections']} connections): {http['requests']} requests in "
          f"{http['seconds']:.1f} s; server {http['server_ms']:.3f} CPU ms, client {http['client_ms']:.3f} CPU ms "
          "per request")
    print(f"RSA-2048: sign {signing['sign_ms']:.3f} CPU ms, verify {signing['verify_ms']:.3f} CPU ms")
    print("no-op dramatiq baseline: " + ", ".join(f"{b['when']} {b['per_second']:.0f}/s" for b in f["baselines"])
          + f" -> {f['noop_per_s']:.0f} messages/s")
    print(f"budget at ratio {GOAL_RATIO}: {f['cores']} cores / ({GOAL_RATIO} x {f['noop_per_s']:.0f}/s) = "
          f"{f['budget_ms']:.2f} CPU ms per refund, for every process")
    print("floor per refund: " + ", ".join(f"{name} {ms:.2f}" for name, ms in f["floor_parts_ms"].items())
          + f" = {f['floor_ms']:.2f} CPU ms")
    print(f"FLOOR / BUDGET = {f['floor_ms'] / f['budget_ms']:.2f}; left for Postgres, Redis, dramatiq and all "
          f"application logic: {f['budget_ms'] - f['floor_ms']:.2f} CPU ms per refund")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "_server":
        return serve(int(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="HTTP requests measured")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections of the HTTP client")
    parser.add_argument("--rsa", type=int, default=2_000, help="RSA signatures (and verifications) measured")
    parser.add_argument("--baseline", type=int, default=20_000, help="no-op messages per baseline")
    parser.add_argument("--smoke", action="store_true", help="a tiny run for CI")
    h.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.rsa, args.baseline = min(args.requests, 500), min(args.rsa, 50), min(args.baseline, 2000)
    return h.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
