"""A faithful simulated PagoEfectivo gateway (docs/PROTOCOL.md) for the demo and the tests.

It is a party of its own, as PagoEfectivo is: it speaks the wire protocol of
``pagoefectivo.protocol`` only (never the client) and keeps its own registry of merchants
(onboarded through it, or from a seed file), its own tokens, CIPs, refunds and ledger in
memory. It sends real signed notifications (one attempt and a second one, as published)
and injects faults on demand.
"""

from .app import SANDBOX, Sandbox, create_app
from .chaos import ChaosConfig, ChaosError
from .cli import main
from .seed import Seed, SeedError, load_seed

__all__ = ["SANDBOX", "ChaosConfig", "ChaosError", "Sandbox", "Seed", "SeedError", "create_app", "load_seed", "main"]
