"""``python -m otelprof_middleware.cli``: the ``otelprof`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
