"""How anything shown to people names an unplug lease: its label, never its id.

A lease id is a credential: whoever has it may renew or release the lease in the
guest. Reports, errors, logs and unplugctl's output name a lease by its label, the
first 12 hex digits of the id's SHA-256, which the holder can match and nobody can
turn back into the id. Shared: the agent labels its leases in reports and logs, the
host labels the one it took in its output.
"""

from __future__ import annotations

__all__ = ["lease_label"]


def lease_label(lease_id: str) -> str:
    """The label of a lease id."""
    import hashlib  # here, not at the top: it loads libcrypto (~3.3 MiB), which most processes never need

    return hashlib.sha256(lease_id.encode("utf-8", "surrogateescape")).hexdigest()[:12]
