"""Hypervisor backends: QMP (qemu.qmp) and libvirt (libvirt-python)."""
