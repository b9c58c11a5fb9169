"""Test-wide setup: import path for shared test helpers and hypothesis profiles.

Shared helpers are imported by their full name, e.g.
`from tests.protocols.strategies import channel_states`. For that the repository root must
be on `sys.path` whichever way pytest was started (`pytest`, `python -m pytest`, one file),
so this file, which pytest loads before any test module, puts it there.

Hypothesis profiles: `dev` (default) and `ci` (chosen when the environment variable `CI` is
set to anything but empty, `0` or `false`). `HYPOTHESIS_PROFILE=<name>` overrides both.
Tests that must run a given number of examples set `max_examples` themselves; the profiles
only set deadlines, health checks and reporting.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

settings.register_profile(
    "dev",
    deadline=timedelta(seconds=1),
)
settings.register_profile(
    "ci",
    derandomize=False,
    deadline=None,  # shared CI runners stall unpredictably; a deadline there only flakes
    print_blob=True,  # a failure prints the blob that replays it with @reproduce_failure
    suppress_health_check=[HealthCheck.too_slow],
)


def _profile_name() -> str:
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    ci = os.environ.get("CI", "").strip().lower()
    return "ci" if ci not in ("", "0", "false", "no") else "dev"


settings.load_profile(_profile_name())
