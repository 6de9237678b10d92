"""``python -m receiver``: serve the notify_url until SIGTERM or SIGINT.

Settings: DATABASE_URL, REFUNDS_MASTER_KEY (or REFUNDS_MASTER_KEY_FILE), RECEIVER_PORT
(default 8081), RECEIVER_HOST (default 0.0.0.0), RECEIVER_ALLOWED_CIDRS and
RECEIVER_TRUSTED_PROXIES (comma-separated CIDRs, default empty: see ``sources``). A missing
or malformed one stops the process at start with one line naming it (exit 2).
"""

from __future__ import annotations

import os
import sys

from refunds import service
from refunds.vault import vault_from_settings

from .app import create_app
from .sources import SourcePolicy

DEFAULT_HOST = "0.0.0.0"


def main() -> int:
    def check(s):
        s.require("database_url")
        s.master_key()
        SourcePolicy.from_settings(s.receiver_allowed_cidrs, s.receiver_trusted_proxies)

    settings = service.load_settings("receiver", check)
    if settings is None:
        return 2
    host = os.environ.get("RECEIVER_HOST", "").strip() or DEFAULT_HOST
    sources = SourcePolicy.from_settings(settings.receiver_allowed_cidrs, settings.receiver_trusted_proxies)
    app = create_app(database_url=settings.database_url, vault=vault_from_settings(settings), sources=sources)
    # access_log off: the app logs one line per notification itself
    return service.run("receiver", app, host, settings.receiver_port, access_log=None)


if __name__ == "__main__":
    sys.exit(main())
