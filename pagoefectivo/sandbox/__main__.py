"""``python -m pagoefectivo.sandbox --port P [chaos flags]``."""

import sys

from . import main

sys.exit(main())
