"""The delayed-retry schedule (workers.retries.retry_delay_ms)."""

from __future__ import annotations

from workers.retries import FAST_RETRIES, FAST_RETRY_SECONDS, MAX_BACKOFF_SECONDS, retry_delay_ms


def bounds(attempts: int, samples: int = 400) -> tuple[float, float]:
    delays = [retry_delay_ms(attempts) / 1000 for _ in range(samples)]
    return min(delays), max(delays)


def test_the_first_retries_come_within_seconds_so_refunds_move_soon_after_a_fault_ends():
    assert FAST_RETRIES >= 3
    low, high = bounds(1)
    assert 1 <= low and high <= 2
    for attempts in range(2, FAST_RETRIES + 1):
        low, high = bounds(attempts)
        assert FAST_RETRY_SECONDS / 2 <= low and high <= FAST_RETRY_SECONDS


def test_then_the_delays_double_up_to_an_hour():
    for k in range(1, 16):
        ceiling = min(2 ** k, MAX_BACKOFF_SECONDS)
        low, high = bounds(FAST_RETRIES + k)
        assert ceiling / 2 <= low and high <= ceiling, (k, low, high)
    assert bounds(FAST_RETRIES + 30)[1] <= MAX_BACKOFF_SECONDS
