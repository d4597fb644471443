"""``python -m core.run``: the headless entry the design names, kept where users and scripts expect it.

Training is orchestrated by the application layer (``app.run``); this module only forwards to it, the one
place the library names the application (allowed by the layer contract in pyproject.toml).
"""

from __future__ import annotations

import sys

from app.run import RunResult, build_parser, main, resolve_config, run

__all__ = ["RunResult", "build_parser", "main", "resolve_config", "run"]

if __name__ == "__main__":
    sys.exit(main())
