"""A faithful simulated PagoEfectivo gateway (docs/PROTOCOL.md) for the demo and the tests.

It speaks the wire protocol of ``pagoefectivo.protocol`` only (never the client), keeps
its own tokens, CIPs, refunds and ledger in memory, reads merchants and payments from the
project's database or from a seed file, sends real signed notifications (retried on a
provider-like schedule) and injects faults on demand.
"""

from .app import SANDBOX, Sandbox, create_app
from .chaos import ChaosConfig, ChaosError
from .cli import main
from .seed import Seed, SeedError, load_seed

__all__ = ["SANDBOX", "ChaosConfig", "ChaosError", "Sandbox", "Seed", "SeedError", "create_app", "load_seed", "main"]
