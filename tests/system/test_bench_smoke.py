"""Every benchmark runs end to end at a tiny size, so bench/ keeps working as the code under it
changes. Their figures are not judged here (a benchmark is not a timed test): only that each
one runs its real services to the end, checks what it checks (ledger, answers) and prints its
figures last."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tests.helpers import ROOT

pytestmark = pytest.mark.bench

BENCHMARKS = [  # script, a tiny size, the line its report ends with, what it checks of the run
    ("e2e_bench.py", ["--smoke"], "RATIO refunds/s : no-op messages/s", ["ledger: ok"]),
    ("latency_bench.py", ["--smoke"], "RESULT best", []),
    ("ratelimit_bench.py", ["--smoke"], "RESULT fairness", ["RESULT utilisation"]),
    ("memory_bench.py", ["--smoke"], "others (not judged)", ["ledger ok", "RESULT worker RSS growth"]),
    ("idle_bench.py", ["--smoke"], "RESULT idle refund workers", []),
    ("floor_bench.py", ["--smoke"], "FLOOR / BUDGET", []),
    ("receiver_bench.py", ["--duration", "1", "--rounds", "1", "--rate", "200", "--rate-duration", "1"],
     "baseline at 200/s", ["ratio receiver/baseline"]),
    ("intake_bench.py", ["--refunds", "300", "--rounds", "1", "--baseline-messages", "1000"],
     "other jobs on the machine used", ["HTTP intake", "Python API"]),
    # its own embedded servers (it restarts Postgres and empties Redis); the money checks, not the times
    ("recovery_bench.py", ["--small"], "OBJECTIVES met", ["lost: 0", "ledger: ok"]),
    # every refund final, every event of the rounds with webhooks on delivered and received
    ("webhooks_bench.py", ["--small"], "RESULT webhooks on / off", ["delivered: all", "ledger: ok"]),
]


@pytest.mark.parametrize(("script", "size", "last", "checked"), BENCHMARKS, ids=[b[0] for b in BENCHMARKS])
def test_benchmark_runs_at_a_tiny_size(script, size, last, checked, services, tmp_path):
    # the session's Postgres server and Redis (the benchmark makes its own scratch database)
    env = {**os.environ, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}
    figures = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), *size, "--json", str(figures)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    assert lines and lines[-1].lstrip().startswith(last), run.stdout[-2000:]
    assert "!!" not in run.stdout, run.stdout  # a benchmark's own check of the run failed
    for figure in checked:
        assert figure in run.stdout, run.stdout[-2000:]
    assert json.loads(figures.read_text())
