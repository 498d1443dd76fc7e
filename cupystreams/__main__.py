"""``python -m cupystreams``: the same as the ``cupystreams`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
