"""`python -m synomaly.cli`: the same as the `synomaly` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
