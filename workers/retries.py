"""The workers' retry policy: which retry applies when, in one place.

| layer | applies to | how | budget |
|---|---|---|---|
| in an attempt (``in_attempt_retries``, tenacity) | a transient gateway fault (5xx, connection refused, a timeout before anything was sent), not a 429 | the same call again at once, with exponential jitter | 4 tries, 5 s |
| delayed (``RetryLater`` → ``retry_delay_ms``) | a transient fault that outlived the attempt's retries, an outcome still unknown after asking the gateway, or a status lookup that failed (whatever the gateway answered it, even a refusal: the refund may have been executed) | the refund's message re-queued with a delay; its claim released first | five 1-2 s apart, then 2 s doubling to 1 h, jittered, for ``RETRY_HORIZON_SECONDS``; then manual review |
| rate limit (``refunds.ratelimit``) | not yet the refund's turn in the merchant's schedule, the merchant's window full as the request is to leave, or the gateway said 429 | re-queued to arrive at its slot; a full window is waited out in place; a 429 pauses the merchant for Retry-After, for every worker, and the next attempt sends without asking for status (nothing was executed); never counts as a retry | none: it is a wait, not a failure |
| status checks (``workers.status_schedule``) | a refund the gateway accepted (pending) that no notification settled | its status asked after 60 s, then every 5 min five times, then hourly | a day; then manual review |
| message (dramatiq ``Retries``, ``ACTOR_RETRIES``) | anything else the actor raises: Postgres or Redis unreachable, a bug | dramatiq re-delivers the message with its backoff | 60 times, 1 s to 1 h |

A refund is never sent blind twice: an attempt after an earlier one asks the gateway for the
refund's status first (``workers.sender``). A delayed retry always releases the refund's
claim first, so the retry can take it at once.
"""

from __future__ import annotations

import random

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from pagoefectivo.errors import RateLimited, TransientError

# delayed retries continue at least this long, from when the refund last entered queued, before manual review
RETRY_HORIZON_SECONDS = 26 * 3600
MAX_BACKOFF_SECONDS = 3600
FAST_RETRIES, FAST_RETRY_SECONDS = 5, 2  # the first delayed retries: 1-2 s apart (about 8 s in all)
# dramatiq's own retries of a message whose actor raised (see the table above)
ACTOR_RETRIES = {"max_retries": 60, "min_backoff": 1_000, "max_backoff": 3_600_000}


class RetryLater(Exception):
    """A transient fault outlived the in-attempt retries: retry the refund later, with backoff.
    ``code``: the gateway's code for the fault, if it gave one."""

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code


def _transient_not_rate_limit(exc: BaseException) -> bool:
    return isinstance(exc, TransientError) and not isinstance(exc, RateLimited)


def in_attempt_retries() -> AsyncRetrying:
    """Short retries inside one attempt: a few seconds in all, well within the actor's time limit."""
    return AsyncRetrying(
        retry=retry_if_exception(_transient_not_rate_limit),
        stop=stop_after_attempt(4) | stop_after_delay(5),
        wait=wait_exponential_jitter(multiplier=0.1, max=1.5),
        reraise=True,
    )


def retry_delay_ms(attempts: int) -> int:
    """The delay before a refund's next attempt after ``attempts`` attempts, jittered within the
    upper half of its ceiling: at most ``FAST_RETRY_SECONDS`` for the first ``FAST_RETRIES``
    (most gateway faults, a 429 burst, a 5xx, a restart, are over in seconds, and the refunds
    they held should not wait long after), then doubling from 2 s to an hour."""
    if attempts <= FAST_RETRIES:
        ceiling = min(FAST_RETRY_SECONDS, 2 ** attempts)
    else:
        ceiling = min(MAX_BACKOFF_SECONDS, 2 ** min(attempts - FAST_RETRIES, 12))
    return int(1000 * random.uniform(ceiling / 2, ceiling))
