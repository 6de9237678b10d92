"""refundctl demo, sandbox serve and sandbox onboard: running the system."""

from __future__ import annotations

import asyncio

from .common import Unavailable, Usage, http_url, with_json


def cmd_sandbox_serve(args, extra: list[str]) -> int:
    """The sandbox on our guarded server (refunds.serving: header deadlines, a connection cap)."""
    from pagoefectivo.sandbox import main as sandbox_main
    from refunds import service

    return sandbox_main(extra, serve=lambda app, host, port: service.run("sandbox", app, host, port, access_log=None))


def cmd_sandbox_onboard(args) -> int:
    """Hand a sandbox gateway a merchant's keys and notify URL, as its seller would PagoEfectivo."""
    import aiohttp

    from refunds.merchants import get_merchant

    from ..onboarding import onboard
    from .common import emit, settings, vault, with_conn

    sandbox_url = args.sandbox_url or settings().pagoefectivo_base_url
    receiver_url = args.receiver_url or settings().refunds_notify_url
    if not sandbox_url:
        raise Usage("--sandbox-url (or PAGOEFECTIVO_BASE_URL) names the sandbox gateway")
    merchant = asyncio.run(with_conn(lambda conn: get_merchant(conn, args.merchant)))
    if merchant.env != "sandbox":
        raise Usage(f"{args.merchant} is a {merchant.env} merchant: a sandbox gateway knows sandbox merchants only")

    async def run():
        async with aiohttp.ClientSession() as http:
            return await onboard(http, sandbox_url, merchant, vault(), receiver_url=receiver_url)

    try:
        registered = asyncio.run(run())
    except (aiohttp.ClientError, OSError) as exc:
        raise Unavailable(f"sandbox gateway at {sandbox_url} unreachable: {exc}") from None
    except RuntimeError as exc:  # the gateway refused the registration
        raise Usage(str(exc)) from None
    emit(args, registered, lambda: print(f"{args.merchant} onboarded with {sandbox_url}"
                                         f" (notify URL {registered.get('notifyUrl') or 'none'})"))
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    return run_demo(refunds=args.refunds, merchants=args.merchants, chaos=args.chaos, keep_running=args.keep_running,
                    log_dir=args.log_dir)



def register(sub) -> None:
    demo = sub.add_parser("demo", help="run the whole system on the embedded default")
    demo.add_argument("--refunds", type=int, default=1000)
    demo.add_argument("--merchants", type=int, default=5)
    demo.add_argument("--chaos", action="store_true", help="turn on gateway faults")
    demo.add_argument("--keep-running", action="store_true", help="keep the services up after the summary")
    demo.add_argument("--log-dir", default=None, help="keep each service's log in this folder")
    demo.set_defaults(func=cmd_demo)

    sandbox = sub.add_parser("sandbox", help="the sandbox gateway: serve it, onboard a merchant with it").add_subparsers(dest="sandbox_command", required=True)
    serve = sandbox.add_parser("serve", help="the PagoEfectivo sandbox gateway (all sandbox flags pass through)",
                               add_help=False)
    serve.set_defaults(func=cmd_sandbox_serve, passthrough=True)
    onboard = with_json(sandbox.add_parser(
        "onboard", help="register a sandbox merchant (keys, notify URL) with a sandbox gateway"))
    onboard.add_argument("merchant", help="the merchant's id in our store")
    onboard.add_argument("--sandbox-url", default=None, type=http_url,
                         help="the sandbox gateway (default: PAGOEFECTIVO_BASE_URL)")
    onboard.add_argument("--receiver-url", default=None, type=http_url,
                         help="the receiver's public base URL, for a merchant without its own notify URL"
                              " (default: REFUNDS_NOTIFY_URL)")
    onboard.set_defaults(func=cmd_sandbox_onboard)
