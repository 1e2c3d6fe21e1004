"""Readers of sysfs, procfs, /dev and netlink. Each reads through Roots and has a pure parse_* half."""
