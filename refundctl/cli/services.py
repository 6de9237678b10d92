"""refundctl demo and sandbox serve: running the system."""

from __future__ import annotations




def cmd_sandbox_serve(args, extra: list[str]) -> int:
    from pagoefectivo.sandbox import main as sandbox_main

    return sandbox_main(extra)


def cmd_demo(args) -> int:
    from ..demo import run_demo

    return run_demo(refunds=args.refunds, merchants=args.merchants, chaos=args.chaos, keep_running=args.keep_running)



def register(sub) -> None:
    demo = sub.add_parser("demo", help="run the whole system on the embedded default")
    demo.add_argument("--refunds", type=int, default=1000)
    demo.add_argument("--merchants", type=int, default=5)
    demo.add_argument("--chaos", action="store_true", help="turn on gateway faults")
    demo.add_argument("--keep-running", action="store_true", help="keep the services up after the summary")
    demo.add_argument("--log-dir", default=None, help="keep each service's log in this folder")
    demo.set_defaults(func=cmd_demo)

    sandbox = sub.add_parser("sandbox").add_subparsers(dest="sandbox_command", required=True)
    serve = sandbox.add_parser("serve", help="the PagoEfectivo sandbox gateway (all sandbox flags pass through)",
                               add_help=False)
    serve.set_defaults(func=cmd_sandbox_serve, passthrough=True)
