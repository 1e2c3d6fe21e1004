"""unplugd: is it safe to hot-unplug this PCI device from the VM right now?

Subpackages:
    unplugd.v1      generated protobuf/gRPC code (sources in proto/unplugd/v1)
    unplugd.agent   the guest agent (repo: agent/)
    unplugd.host    the host library and unplugctl (repo: host/)

Importing the package loads nothing (not even logging: a sixth of `unplugctl --help`'s work,
issue 13). Its modules log to loggers named after them under `unplugd`, with no handler of
their own: the application configures logging (both CLIs do); one that does not gets
Python's last-resort handler, WARNING and above on stderr.
"""

__version__ = "0.1.0"
