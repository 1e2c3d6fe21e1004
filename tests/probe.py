"""Run a snippet in a fresh interpreter that imports what this one does, and read back its answer.

What a fresh process loads, or how much memory it gives back, cannot be seen from inside the test
process, which has imported everything already. The snippet ends by printing one repr() of plain
values; probe() returns it evaluated.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from typing import Any


def probe(code: str, *argv: str) -> Any:
    """Run `code` under this interpreter with this sys.path (argv after it); its printed repr, evaluated."""
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {sys.path!r}\n{code}", *argv],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return ast.literal_eval(out)
