"""VM test harness: boot the unplugd guest image under QEMU and drive it.

    from tests.vm import GuestVM, build_image, disk_on_root_port, virtio_net

See guest.py for what every VM gets, devices.py for the device helpers.
"""

from tests.vm.devices import (
    PCIE_NATIVE_HOTPLUG,
    DataDisk,
    Device,
    disk_on_root_port,
    multifunction_slot,
    net_on_root_port,
    pci_bridge,
    pcie_pci_bridge,
    pcie_root_port,
    root_ports,
    virtio_disk,
    virtio_net,
)
from tests.vm.guest import DEFAULT_GUEST_CONFIG, MUTATIONS_CONFIG, SERIAL_ADDR, BootTimeout, GuestVM, VMError
from tests.vm.image import GuestImage, build_debs, build_image, cache_dir, guest_debs
from tests.vm.qga import ExecResult, GuestAgentError, GuestExecTimeout

__all__ = [
    "DEFAULT_GUEST_CONFIG",
    "MUTATIONS_CONFIG",
    "PCIE_NATIVE_HOTPLUG",
    "SERIAL_ADDR",
    "BootTimeout",
    "DataDisk",
    "Device",
    "ExecResult",
    "GuestAgentError",
    "GuestExecTimeout",
    "GuestImage",
    "GuestVM",
    "VMError",
    "build_debs",
    "build_image",
    "cache_dir",
    "disk_on_root_port",
    "guest_debs",
    "multifunction_slot",
    "net_on_root_port",
    "pci_bridge",
    "pcie_pci_bridge",
    "pcie_root_port",
    "root_ports",
    "virtio_disk",
    "virtio_net",
]
