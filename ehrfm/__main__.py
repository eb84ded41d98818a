"""``python -m ehrfm ...`` is the `ehrfm` command (``ehrfm.cli``)."""

import sys

from .cli import main

sys.exit(main())
