"""The agent's exception root.

    AgentError
     +-- ReadError              a file in /sys, /proc or /dev could not be read
     |    +-- Vanished          it disappeared mid-scan (ENOENT, ESRCH)
     |    +-- NotPermitted      EACCES / EPERM
     +-- ParseError             its content is not what the kernel writes
     +-- UnknownDevice          a name matched nothing in the inventory
     +-- InvalidArgument        a request is malformed
     +-- MutationDisabled       a mutating call while the config forbids it
     |    +-- ReleaseDisabled   RequestRelease while [release] (or [mutations]) is off
     +-- ClaimConflict          PrepareUnplug could not claim every device
     +-- LeaseNotFound          release/renew of a lease that does not exist
     +-- ReleaseInProgress      RequestRelease while another one runs its hooks
     +-- WatchStopped           the watcher's event sources failed; its streams end
     +-- ClaimFailed            the kernel refused one exclusive open (mutations/claims.py)
     +-- LinkError              an interface could not be read or set down/up (mutations/links.py)
     +-- NetlinkError           a malformed or inconsistent rtnetlink answer (collectors/rtnetlink.py)
     +-- ConfigError            the configuration is unreadable or invalid (config.py)
     +-- ServeError             the gRPC server could not start (rpc/server.py)
     +-- BridgeError            an enabled transport bridge could not start (transports/bridges.py)
     +-- TlsError               TCP cannot be served: TLS files, the port (transports/tls.py)
     +-- TreeTextError          a text archive of a tree is malformed or escapes its directory (treetext.py)

The classes named with a module live there, beside what raises them; the rest live here.
rpc/errors.py maps each to one gRPC status code; the CLI maps them to exit codes.
tests/unit/test_exception_trees.py checks this drawing against the classes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AgentError",
    "ClaimConflict",
    "InvalidArgument",
    "LeaseNotFound",
    "MutationDisabled",
    "NotPermitted",
    "ParseError",
    "ReadError",
    "ReleaseDisabled",
    "ReleaseInProgress",
    "UnknownDevice",
    "Vanished",
    "WatchStopped",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ReadError(AgentError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = path
        self.reason = reason


class Vanished(ReadError):
    pass


class NotPermitted(ReadError):
    pass


class ParseError(AgentError):
    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"malformed {source}: {detail}")
        self.source = source
        self.detail = detail


class UnknownDevice(AgentError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no PCI function, interface or block device matches {name!r}")
        self.name = name


class InvalidArgument(AgentError):
    pass


class MutationDisabled(AgentError):
    def __init__(self, call: str) -> None:
        super().__init__(
            f"{call} changes guest state and is disabled; set [mutations] enabled = true "
            "in /etc/unplugd/config.toml to allow it"
        )


class ReleaseDisabled(MutationDisabled):
    def __init__(self, call: str, *, mutations: bool) -> None:
        AgentError.__init__(
            self,
            f"{call} runs the guest's release hooks and is disabled; set "
            + ("" if mutations else "[mutations] enabled = true and ")
            + "[release] enabled = true in /etc/unplugd/config.toml to allow it",
        )


class ClaimConflict(AgentError):
    def __init__(self, message: str, reasons: Sequence[str]) -> None:
        super().__init__(message + ("" if not reasons else ": " + "; ".join(reasons)))
        self.reasons = list(reasons)


class LeaseNotFound(AgentError):
    # The message never repeats the id: it is a credential, and errors are logged.
    def __init__(self) -> None:
        super().__init__("no such lease (released, expired, or never granted)")


class ReleaseInProgress(AgentError):
    """Another RequestRelease is running its hooks: they run one call at a time."""


class WatchStopped(AgentError):
    """The shared watcher died (its event sources failed): the stream ends, subscribing again starts anew."""
