"""Fast tests of the VM harness and the packaging scripts (no VM is booted here)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Literal

import pytest

from tests.conftest import REPO
from tests.vm import (
    Device,
    GuestImage,
    GuestVM,
    disk_on_root_port,
    multifunction_slot,
    pci_bridge,
    pcie_root_port,
    root_ports,
    virtio_disk,
    virtio_net,
)
from tests.vm.guest import watch_process_group
from tests.vm.monitor import Monitor, MonitorError
from tests.vm.qga import GuestAgent, GuestAgentError


def load_image_builder() -> ModuleType:
    path = REPO / "packaging" / "guest-image" / "build.py"
    spec = importlib.util.spec_from_file_location("guest_image_build", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


builder = load_image_builder()


# -- device helpers --


def device_opt(dev: Device, driver: str) -> dict[str, str]:
    """The key=value options of the -device argument for driver."""
    for flag, value in zip(dev.args, dev.args[1:], strict=False):
        if flag == "-device" and value.split(",")[0] == driver:
            return dict(kv.split("=", 1) for kv in value.split(",")[1:])
    raise AssertionError(f"no -device {driver} in {dev.args}")


def test_virtio_disk_places_and_names_the_disk() -> None:
    dev = virtio_disk("d0", bus="rp1", addr="0x0.0", size="8M", multifunction=True)
    opts = device_opt(dev, "virtio-blk-pci")
    assert opts == {"drive": "drv-d0", "id": "d0", "serial": "d0", "bus": "rp1", "addr": "0x0.0", "multifunction": "on"}
    assert dev.ids == ("d0",)
    assert [(d.name, d.size) for d in dev.disks] == [("d0.qcow2", "8M")]
    assert any("{workdir}/d0.qcow2" in a for a in dev.args)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: virtio_disk("bad id"), "not a valid QEMU id"),
        (lambda: virtio_disk("0starts-with-digit"), "not a valid QEMU id"),
        (lambda: virtio_disk("d", serial="x" * 21), "longer than 20"),
        (lambda: root_ports(9), "1 to 8"),
        (lambda: root_ports(2, hotplug=[True]), "one hotplug flag per port"),
    ],
)
def test_device_helpers_refuse_bad_input(make: Callable[[], Device], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        make()


def test_virtio_net_is_always_restricted() -> None:
    dev = virtio_net("n0", mac="52:54:00:00:00:01")
    assert "user,id=net-n0,restrict=on" in dev.args
    assert device_opt(dev, "virtio-net-pci")["mac"] == "52:54:00:00:00:01"


def test_root_ports_share_one_slot_like_libvirt() -> None:
    dev = root_ports(3, prefix="p", first_chassis=5, slot_addr=0x4, hotplug=[True, False, True])
    ports = [dict(kv.split("=", 1) for kv in a.split(",")[1:]) for a in dev.args if a.startswith("pcie-root-port")]
    assert [p["id"] for p in ports] == ["p0", "p1", "p2"]
    assert [p["addr"] for p in ports] == ["0x4.0", "0x4.1", "0x4.2"]
    assert [p["chassis"] for p in ports] == ["5", "6", "7"]
    assert [p.get("multifunction") for p in ports] == ["on", None, None]
    assert [p.get("hotplug") for p in ports] == [None, "off", None]


def test_multifunction_slot_and_composition() -> None:
    dev = pcie_root_port("rp9", chassis=9) + multifunction_slot("d", "n", bus="rp9", slot=0)
    assert dev.ids == ("rp9", "d", "n")
    assert device_opt(dev, "virtio-blk-pci")["addr"] == "0x0.0"
    assert device_opt(dev, "virtio-blk-pci")["multifunction"] == "on"
    assert device_opt(dev, "virtio-net-pci")["addr"] == "0x0.1"
    assert device_opt(dev, "pcie-root-port")["chassis"] == "9"
    bridge = pci_bridge("br0", chassis_nr=3, shpc=False)
    assert device_opt(bridge, "pci-bridge") == {"id": "br0", "chassis_nr": "3", "shpc": "off"}


# -- GuestVM command line (not started) --


@pytest.fixture
def fake_image(tmp_path: Path) -> GuestImage:
    img = tmp_path / "img"
    img.mkdir()
    for name in ("disk.raw", "vmlinuz", "initrd.img"):
        (img / name).write_bytes(b"")
    (img / "cmdline").write_text("root=LABEL=x console=ttyS0\n")
    return GuestImage(img)


@pytest.mark.parametrize(("machine", "bus"), [("q35", "pcie.0"), ("pc", "pci.0")])
def test_command_line(fake_image: GuestImage, machine: Literal["q35", "pc"], bus: str) -> None:
    vm = GuestVM(
        machine,
        devices=[disk_on_root_port("data0", chassis=1)],
        image=fake_image,
        packages=None,
        extra_args=["-S"],
    )
    try:
        cmd = vm.command_line()
        joined = " ".join(cmd)
        assert cmd[cmd.index("-machine") + 1] == machine
        assert cmd[cmd.index("-accel") + 1] == "tcg"
        assert f"virtio-serial-pci,id=vser0,bus={bus}," in joined
        assert "name=org.qemu.guest_agent.0" in joined and "name=org.unplugd.agent.0" in joined
        assert f"path={vm.qmp_socket}," in joined and f"path={vm.qga_socket}," in joined
        assert f"file={vm.workdir}/data0.qcow2" in joined and "{workdir}" not in joined
        assert "-fw_cfg" not in cmd  # packages arrive the way a user installs them, not through firmware
        assert "-no-reboot" in cmd  # a guest reboot ends QEMU unless the test asks for reboots
        assert cmd[-1] == "-S"
        vm.allow_reboot = True
        assert "-no-reboot" not in vm.command_line()
    finally:
        vm.close()
    assert not vm.workdir.exists()


def test_rejects_unknown_machine() -> None:
    with pytest.raises(ValueError, match="q35 or pc"):
        GuestVM("virt")  # type: ignore[arg-type]


# -- no leaked QEMU: the watcher --


def test_watcher_kills_the_group_when_its_owner_dies_by_sigkill(tmp_path: Path) -> None:
    pidfile = tmp_path / "victim.pid"
    owner_code = (
        "import subprocess, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.vm.guest import watch_process_group\n"
        "victim = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(victim.pid))\n"
        "watch_process_group(victim.pid)\n"
        "time.sleep(300)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code])
    try:
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline, "owner did not start its victim"
            time.sleep(0.05)
        victim = int(pidfile.read_text())
        time.sleep(0.3)  # let the watcher start reading
        assert process_alive(victim)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 10
        while process_alive(victim):
            assert time.monotonic() < deadline, "victim survived its owner"
            time.sleep(0.05)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_watcher_stays_quiet_while_its_owner_lives(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)
    workdir = tmp_path / "vm"
    workdir.mkdir()
    watcher, fd = watch_process_group(victim.pid, workdir)
    try:
        time.sleep(0.5)
        assert victim.poll() is None and watcher.poll() is None
        os.close(fd)  # the owner lets go: the watcher kills the group, then removes the work directory
        assert victim.wait(10) == -signal.SIGKILL
        assert watcher.wait(10) == 0
        assert not workdir.exists()
    finally:
        victim.kill()
        victim.wait()


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- qemu-ga client against a fake agent with the real port's leftovers --


class FakeQga:
    """Serves one connection like qemu-ga: stale bytes first, 0xFF before sync replies."""

    def __init__(self, path: Path, handler: Callable[[dict[str, object]], bytes]) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.handler = handler
        self.requests: list[dict[str, object]] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(b'{"return": 999}\n\xff{"return": 1}\n')  # a reply left over from an earlier client
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req = json.loads(line.lstrip(b"\xff"))
                    self.requests.append(req)
                    if req["execute"] == "guest-sync-delimited":
                        conn.sendall(b"\xff" + json.dumps({"return": req["arguments"]["id"]}).encode() + b"\n")
                    else:
                        conn.sendall(self.handler(req))


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer
    d = Path(f"/tmp/unplugd-qga-test-{os.getpid()}")
    d.mkdir(exist_ok=True)
    yield d / "qga.sock"
    shutil.rmtree(d, ignore_errors=True)


def test_qga_call_skips_stale_replies(sock_path: Path) -> None:
    FakeQga(sock_path, lambda req: b'{"return": {"version": "7.2"}}\n')
    ga = GuestAgent(sock_path)
    assert ga.call("guest-info") == {"version": "7.2"}
    ga.close()


def test_qga_error_and_exec(sock_path: Path) -> None:
    def handler(req: dict[str, object]) -> bytes:
        if req["execute"] == "guest-exec":
            return b'{"return": {"pid": 42}}\n'
        if req["execute"] == "guest-exec-status":
            return b'{"return": {"exited": true, "exitcode": 3, "out-data": "aGk=", "err-data": ""}}\n'
        return b'{"error": {"class": "CommandNotFound", "desc": "nope"}}\n'

    fake = FakeQga(sock_path, handler)
    ga = GuestAgent(sock_path)
    assert ga.exec(["echo", "hi"], timeout=5) == (3, "hi", "")
    exec_req = next(r for r in fake.requests if r["execute"] == "guest-exec")
    assert exec_req["arguments"]["arg"][-2:] == ["echo", "hi"]  # type: ignore[index]
    assert exec_req["arguments"]["path"] == "timeout"  # type: ignore[index]
    with pytest.raises(GuestAgentError, match="CommandNotFound: nope"):
        ga.call("guest-bogus")
    ga.close()


def test_qga_times_out_on_a_silent_agent(sock_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)  # accepts (backlog) but never answers, like a guest still booting
    try:
        start = time.monotonic()
        assert GuestAgent(sock_path).ping(timeout=0.5) is False
        assert time.monotonic() - start < 3
    finally:
        server.close()


# -- QMP monitor client --


def test_monitor_buffers_events_and_matches_ids(sock_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                req = json.loads(line)
                if req["execute"] == "device_del":
                    f.write(b'{"event": "DEVICE_DELETED", "data": {"path": "/x/virtio-backend"}}\n')
                    f.write(b'{"return": {}, "id": 999}\n')  # not ours
                    f.write(json.dumps({"return": {}, "id": req["id"]}).encode() + b"\n")
                    f.write(b'{"event": "DEVICE_DELETED", "data": {"device": "d0", "path": "/x"}}\n')
                elif req["execute"] == "bad":
                    f.write(json.dumps({"error": {"class": "GenericError", "desc": "no"}, "id": req["id"]}).encode())
                    f.write(b"\n")
                else:
                    f.write(json.dumps({"return": {}, "id": req["id"]}).encode() + b"\n")
                f.flush()

    threading.Thread(target=serve, daemon=True).start()
    mon = Monitor(sock_path)
    try:
        assert mon.execute("device_del", {"id": "d0"}) == {}
        ev = mon.wait_event("DEVICE_DELETED", 5, lambda e: e["data"].get("device") == "d0")
        assert ev["data"]["path"] == "/x"
        assert [e["data"] for e in mon.events] == [{"path": "/x/virtio-backend"}]
        with pytest.raises(MonitorError, match="GenericError: no"):
            mon.execute("bad")
        with pytest.raises(MonitorError, match="no SHUTDOWN event"):
            mon.wait_event("SHUTDOWN", 0.3)
    finally:
        mon.close()
        server.close()


# -- image recipe --


def test_parse_packages() -> None:
    assert builder.parse_packages("# c\n a \n\nb # why\n#x\n") == ["a", "b"]
    listed = builder.parse_packages((REPO / "packaging/guest-image/packages.txt").read_text())
    for needed in ("linux-image-amd64", "qemu-guest-agent", "python3-grpcio", "python3-pyroute2", "systemd-sysv"):
        assert needed in listed


def test_inputs_hash_follows_recipe_content(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe"
    shutil.copytree(REPO / "packaging/guest-image", recipe, symlinks=True)
    base = builder.inputs_hash(recipe)
    assert base == builder.inputs_hash(recipe)
    assert base == builder.inputs_hash(REPO / "packaging/guest-image")  # location does not matter
    (recipe / "build.py").write_text("# logging only\n")
    assert builder.inputs_hash(recipe) == base  # the script is versioned by BUILD_LOGIC_VERSION, not hashed
    assert builder.inputs_hash(recipe, suite="trixie") != base
    (recipe / "packages.txt").write_text((recipe / "packages.txt").read_text() + "htop\n")
    changed = builder.inputs_hash(recipe)
    assert changed != base
    script = recipe / "customize.sh"
    script.chmod(0o644)
    assert builder.inputs_hash(recipe) != changed


def test_is_complete(tmp_path: Path) -> None:
    for name in builder.IMAGE_FILES[:-1]:
        (tmp_path / name).write_text("")
    assert not builder.is_complete(tmp_path)
    (tmp_path / builder.IMAGE_FILES[-1]).write_text("{}")
    assert builder.is_complete(tmp_path)
