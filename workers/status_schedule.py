"""When to ask the gateway again about a refund it accepted but has not settled.

First after 60 s (set when the refund becomes pending), then every 5 minutes five
times, then hourly for a day; after that the refund goes to manual review.
"""

from __future__ import annotations

SCHEDULE_SECONDS = (300,) * 5 + (3600,) * 24


def next_check_delay(checks_done: int) -> float | None:
    """Seconds until the next check after ``checks_done`` checks, or None when the schedule is over."""
    if checks_done - 1 < len(SCHEDULE_SECONDS):
        return float(SCHEDULE_SECONDS[checks_done - 1])
    return None
