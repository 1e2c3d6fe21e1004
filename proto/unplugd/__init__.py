"""unplugd: is it safe to hot-unplug this PCI device from the VM right now?

Subpackages:
    unplugd.v1      generated protobuf/gRPC code (sources in proto/unplugd/v1)
    unplugd.agent   the guest agent (repo: agent/)
    unplugd.host    the host library and unplugctl (repo: host/)
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
