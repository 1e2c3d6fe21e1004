"""Bridges from vsock, virtio-serial and TCP+mTLS to the agent unix socket."""
