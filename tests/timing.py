"""A pytest plugin (loaded by tests/conftest.py): at the end of a run, the tests not marked
chaos, bench or slow that took a second or more, so `make test-fast` stays fast as tests are added."""

from __future__ import annotations

import time

import pytest

SLOW_SECONDS = 1.0  # what `slow` means (pyproject.toml): a test this long leaves `make test-fast`
UNMARKED_SLOW = pytest.StashKey()
LEFT_OUT_OF_THE_FAST_SUBSET = ("chaos", "bench", "slow")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Time each test not marked chaos, bench or slow, so the run can name those that took
    longer than a fast one should (the fast subset stays fast as tests are added)."""
    started = time.monotonic()
    try:
        return (yield)
    finally:
        took = time.monotonic() - started
        if took >= SLOW_SECONDS and not any(item.get_closest_marker(name) for name in LEFT_OUT_OF_THE_FAST_SUBSET):
            item.config.stash.setdefault(UNMARKED_SLOW, []).append((took, item.nodeid))


def pytest_terminal_summary(terminalreporter, config):
    found = sorted(config.stash.get(UNMARKED_SLOW, []), reverse=True)
    if found:
        terminalreporter.section(f"unmarked tests that took {SLOW_SECONDS:g} s or more: mark them slow or make them faster")
        for took, nodeid in found:
            terminalreporter.line(f"{took:6.2f}s {nodeid}")
