"""``python -m receiver``: serve the notify_url until SIGTERM or SIGINT.

Settings: DATABASE_URL, REFUNDS_MASTER_KEY (or REFUNDS_MASTER_KEY_FILE), RECEIVER_PORT
(default 8081), RECEIVER_HOST (default 0.0.0.0), RECEIVER_ALLOWED_CIDRS and
RECEIVER_TRUSTED_PROXIES (comma-separated CIDRs, default empty: see ``sources``),
RECEIVER_JOURNAL_DIR (default ``receiver-journal/<RECEIVER_PORT>`` in the working directory:
one per receiver of a host) and
RECEIVER_JOURNAL_MAX_BYTES (default 512 MiB; see ``journal``); its /metrics on
RECEIVER_METRICS_PORT (default 9181) only. A missing or malformed one,
or a journal directory that cannot be used or is locked by another receiver, stops the
process at start with one line naming it (exit 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from refunds import service
from refunds.vault import vault_from_settings

from .app import create_app
from .journal import Journal, JournalError
from .sources import SourcePolicy

DEFAULT_HOST = "0.0.0.0"


def main() -> int:
    def check(s):
        s.require("database_url")
        vault_from_settings(s)  # the master key and the previous ones, each checked
        SourcePolicy.from_settings(s.receiver_allowed_cidrs, s.receiver_trusted_proxies)

    settings = service.load_settings("receiver", check)
    if settings is None:
        return 2
    host = os.environ.get("RECEIVER_HOST", "").strip() or DEFAULT_HOST
    sources = SourcePolicy.from_settings(settings.receiver_allowed_cidrs, settings.receiver_trusted_proxies)
    try:
        directory = settings.receiver_journal_dir or Path("receiver-journal") / str(settings.receiver_port)
        journal = Journal.open(directory, settings.receiver_journal_max_bytes)
    except JournalError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    app = create_app(database_url=settings.database_url, vault=vault_from_settings(settings), sources=sources,
                     journal=journal)
    # access_log off: the app logs one line per notification itself
    return service.run("receiver", app, host, settings.receiver_port, metrics_port=settings.receiver_metrics_port,
                       access_log=None)


if __name__ == "__main__":
    sys.exit(main())
