"""``python -m receiver``: serve the notify_url until SIGTERM or SIGINT.

Settings: DATABASE_URL, REFUNDS_MASTER_KEY (or REFUNDS_MASTER_KEY_FILE), RECEIVER_PORT
(default 8081), RECEIVER_HOST (default 0.0.0.0). A missing or malformed one stops the
process at start with one line naming it (exit 2).
"""

from __future__ import annotations

import os
import sys

from refunds import service
from refunds.vault import Vault

from .app import create_app

DEFAULT_HOST = "0.0.0.0"


def main() -> int:
    settings = service.load_settings("receiver", lambda s: (s.require("database_url"), s.master_key()))
    if settings is None:
        return 2
    host = os.environ.get("RECEIVER_HOST", "").strip() or DEFAULT_HOST
    app = create_app(database_url=settings.database_url, vault=Vault(settings.master_key()))
    # access_log off: the app logs one line per notification itself
    return service.run("receiver", app, host, settings.receiver_port, access_log=None)


if __name__ == "__main__":
    sys.exit(main())
