"""`unplugctl`'s exit codes: one home for main(), `--help` and the manual page unplugctl(1).

Stdlib only: packaging/docs/generate.py reads MEANING where grpc and protobuf
may be absent (a package build root). Which verdict exits with which code is
`unplugd.host.cli.EXIT`.
"""

from __future__ import annotations

import signal
from enum import IntEnum

from unplugd.stdio import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED

__all__ = ["MEANING", "SCOPE", "Exit", "help_paragraph"]


class Exit(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    BLOCKED_BY_GUEST = 3
    GUEST_UNREACHABLE = 4
    NOT_HOTPLUGGABLE = 5
    NEEDS_COMPANIONS = 6
    PENDING = 7
    UNCONFIRMED = 8
    HYPERVISOR_LOST = 9
    RELEASE_DISABLED = 10
    NOT_CONFIRMED = 11
    REJECTED = 12
    ROLLBACK_INCOMPLETE = 13
    INTERRUPTED = EXIT_INTERRUPTED
    # stdout's reader left (`| head -1`): what a shell reports for a command killed by SIGPIPE.
    BROKEN_PIPE = EXIT_BROKEN_PIPE
    # what a shell reports for a command killed by SIGTERM; unplugctl ends as on SIGINT first (cli.py)
    TERMINATED = 128 + signal.SIGTERM


MEANING: dict[Exit, str] = {
    Exit.OK: "unpluggable / unplugged (status: printed); fleet status/check: every domain answered",
    Exit.FAILURE: "failure (hypervisor or agent error); fleet: some domain failed",
    Exit.USAGE: "usage error: bad arguments, unknown or ambiguous device",
    Exit.BLOCKED_BY_GUEST: "blocked by the guest",
    Exit.GUEST_UNREACHABLE: "guest unreachable or unknown; fleet: some domain's hypervisor, domain or agent "
    "could not be reached",
    Exit.NOT_HOTPLUGGABLE: "not hotpluggable (plug: no free hotpluggable slot there, or libvirt and a multifunction "
    "slot; nothing was added)",
    Exit.NEEDS_COMPANIONS: "needs companions (other functions share the slot)",
    Exit.PENDING: "unplug still pending at --timeout",
    Exit.UNCONFIRMED: "unplugged, but the guest did not confirm",
    Exit.HYPERVISOR_LOST: "the hypervisor went away while waiting (QEMU exited, libvirtd did not come back); "
    "each function says whether it had left",
    Exit.RELEASE_DISABLED: "release (or unplug --release): the guest does not allow RequestRelease "
    "([mutations] and [release] enabled = true in its config)",
    Exit.NOT_CONFIRMED: "plug: a function did not arrive in the guest (MISSING, NO_DRIVER) before --timeout; what was "
    "added was removed again (kept with --keep-partial)",
    Exit.REJECTED: "plug: the hypervisor rejected a device or backend; what was added was removed again (kept with "
    "--keep-partial)",
    Exit.ROLLBACK_INCOMPLETE: "plug: the rollback left something behind (each leftover is listed)",
    Exit.INTERRUPTED: "interrupted (SIGINT)",
    Exit.BROKEN_PIPE: "stdout closed early (| head): the output was cut short, nothing else went wrong",
    Exit.TERMINATED: "terminated (SIGTERM), as on SIGINT: a --prepare lease released, a requested unplug said to "
    "be pending",
}

# check and wait-ready exit with their verdict's code; unplug too when it refuses.
SCOPE = (
    "check, wait-ready, and unplug when refused, also after --prepare's lease when the guest changed; "
    "release and unplug --release: 3 when a function is still busy after the hooks; "
    "plug: 0 every function present in the guest, 4 no agent to confirm with, 5 no room, 9 and 11-13 as below"
)


def help_paragraph() -> str:
    """The "exit codes" paragraph of `--help` (the manual page has its own EXIT STATUS instead)."""
    lines = [f"  {code.value} {MEANING[code]}" for code in Exit]
    return "\n".join([f"exit codes ({SCOPE}):", *lines])
