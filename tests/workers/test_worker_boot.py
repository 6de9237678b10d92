"""A worker whose resources cannot open stops at once, in one line, instead of reporting ready."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow  # dramatiq's parent waits up to 30 s for a child that never reports ready
def test_a_worker_whose_database_is_missing_exits_3_in_one_line(database_url, redis_url):
    missing = database_url.rsplit("/", 1)[0] + "/no_such_database_here"
    env = {**os.environ, "DATABASE_URL": missing, "REDIS_URL": redis_url, "METRICS_PORT": "0"}
    run = subprocess.run([sys.executable, "-m", "dramatiq", "workers", "--processes", "1", "--threads", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 3, run.stderr[-2000:]
    output = run.stdout + run.stderr
    assert "worker resources cannot open: database unavailable" in output
    assert "no_such_database_here" in output
    assert "Traceback" not in output and "ready for action" not in output
