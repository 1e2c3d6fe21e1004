"""Section 6 (issue 8): bounded resources with 10,000 mount namespaces and 10,000 processes.

The measurement is tests/reliability/check_namespaces.py (also a row of
`make reliability`): the agent's fds, RSS and threads before, with the crowd
and after; a full GetReport with it; a mount in a namespace the agent holds
a file for and in one past [watch] max_namespace_fds, timed to the
WatchReport message. --quick: 2,000 of each.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from tests.bench.results import Row, SectionResult
from tests.reliability import check_namespaces
from tests.reliability.registry import Options

__all__ = ["run"]

KEY = "bounds"
TITLE = "6. bounded resources: 10,000 mount namespaces + 10,000 processes, agent watching (issue 8)"


def run(quick: bool) -> SectionResult:
    result = SectionResult(KEY, TITLE)
    if os.geteuid() != 0:
        result.skipped = "needs root (mount namespaces, nsenter)"
        return result
    t0 = time.monotonic()
    n = 2000 if quick else 10_000
    for row in check_namespaces.run(replace(Options(), namespaces=n, processes=n)):
        verdict = {True: "met", False: "MISSED", None: ""}[row.ok]
        result.rows.append(Row(row.tried, value=row.often, note=row.happened, verdict=verdict, raw=row.raw))
    result.seconds = time.monotonic() - t0
    return result
