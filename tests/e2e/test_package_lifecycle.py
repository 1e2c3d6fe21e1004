"""The guest package's whole life on a stock Debian 12 guest, as a user lives it: `dpkg -i`, reboot,
the host reaches the agent over virtio-serial; edit the config, upgrade: the service restarts and the
edit stays; remove: stopped, no socket left; purge: the config is gone. (The same installed package
on a pc guest: test_real_kernel_pc.py.)

The stock guest has nothing of ours and nothing that loads virtio_console early, so the agent starts
at boot before udev has loaded the module that makes its port: the case that once left the agent
locked out of its port until someone restarted it by hand. One VM for the module (a TCG boot costs
half a minute); the tests run in file order, each building on the last.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf.json_format import MessageToDict

from tests.conftest import require_vm_tools
from tests.vm import GuestVM, disk_on_root_port, guest_debs
from tests.vm.install import CONFIG, dpkg_install

UPGRADE_VERSION = "99.0.0"


@pytest.fixture(scope="module")
def vm() -> Iterator[GuestVM]:
    require_vm_tools()
    with GuestVM(
        "q35",
        devices=[disk_on_root_port("data0", chassis=1)],
        packages=None,
        config=None,
        name="unplugd-e2e-lifecycle",
        allow_reboot=True,
    ) as guest:
        guest.wait_booted(timeout=600)
        yield guest


def agent_answers(vm: GuestVM) -> dict[str, object]:
    """The report the running service gives the host through the VM's virtio-serial port."""
    from unplugd.host.client import SyncAgentClient

    client = SyncAgentClient(f"serial:{vm.agent_socket}", timeout=60, connect_timeout=60)
    try:
        return MessageToDict(client.get_report([], timeout=60))
    finally:
        client.close()


def service(vm: GuestVM, prop: str) -> str:
    return vm.exec(["systemctl", "show", "-P", prop, "unplugd.service"], check=True).stdout.strip()


def journal(vm: GuestVM) -> str:
    return vm.exec("journalctl -b -u unplugd.service --no-pager -o cat", timeout=60).stdout


def test_stock_guest_has_nothing_of_ours(vm: GuestVM) -> None:
    assert vm.exec("dpkg-query -W unplugd").rc != 0
    # nothing preloads the module behind the agent's port: udev loads it when the device shows up
    out = vm.exec(
        "grep -rls 'virtio_console\\|unplugd' /etc/modules /etc/modules-load.d /etc/modprobe.d /etc/systemd /etc/udev"
    ).stdout
    assert out.strip() == "", f"the test image carries something of ours: {out}"


def test_install_starts_and_enables_the_service(vm: GuestVM) -> None:
    dpkg_install(vm, guest_debs())
    assert vm.exec("systemctl is-enabled unplugd.service").stdout.strip() == "enabled"
    rc = vm.exec(
        "for i in $(seq 100); do systemctl is-active -q unplugd.service && exit 0; sleep 0.3; done; exit 1", timeout=60
    ).rc
    assert rc == 0, journal(vm)
    assert "functions" in agent_answers(vm)


def test_after_a_reboot_the_host_reaches_the_agent_over_its_port(vm: GuestVM) -> None:
    vm.reboot()
    assert vm.exec("systemctl is-active unplugd.service").stdout.strip() == "active", journal(vm)
    report = agent_answers(vm)
    assert report.get("functions"), report
    log = journal(vm)
    assert "Operation not permitted" not in log, log
    # The module arrived after boot started, through udev, as on any stock guest.
    assert vm.exec("test -e /dev/virtio-ports/org.unplugd.agent.0").rc == 0


def test_upgrade_restarts_the_service_and_keeps_the_edited_config(vm: GuestVM) -> None:
    vm.exec(
        f"sed -i 's/^exclusive_probe = true/exclusive_probe = false/' {CONFIG} && "
        f"echo '# edited by the administrator' >>{CONFIG}",
        check=True,
    )
    edited = vm.read_file(CONFIG)
    assert "exclusive_probe = false" in edited
    pid_before = service(vm, "MainPID")
    assert pid_before not in ("", "0")
    dpkg_install(vm, guest_debs(version=UPGRADE_VERSION))
    assert vm.exec("dpkg-query -W -f '${Version}' unplugd", check=True).stdout == UPGRADE_VERSION
    assert vm.read_file(CONFIG) == edited
    assert vm.exec(f"test -e {CONFIG}.dpkg-new -o -e {CONFIG}.dpkg-dist").rc != 0
    rc = vm.exec(
        "for i in $(seq 100); do systemctl is-active -q unplugd.service && exit 0; sleep 0.3; done; exit 1", timeout=60
    ).rc
    assert rc == 0, journal(vm)
    assert service(vm, "MainPID") not in ("", "0", pid_before), "the upgrade did not restart the agent"
    assert "functions" in agent_answers(vm)


def test_remove_stops_the_service_and_leaves_no_socket(vm: GuestVM) -> None:
    vm.exec("dpkg -r unplugd", check=True, timeout=120)
    assert vm.exec("systemctl is-active unplugd.service").stdout.strip() in ("inactive", "unknown")
    assert vm.exec("test -e /run/unplugd/agent.sock").rc != 0
    # anchored: the shell and timeout(1) that run pgrep carry the pattern in their own arguments
    assert vm.exec(["pgrep", "-f", "^/usr/bin/python3 /usr/bin/unplugd serve"]).rc != 0
    assert vm.exec(f"test -f {CONFIG}").rc == 0, "remove keeps the configuration (only purge removes it)"


def test_purge_removes_the_configuration(vm: GuestVM) -> None:
    vm.exec("dpkg -P unplugd python3-unplugd", check=True, timeout=120)
    assert vm.exec("test -e /etc/unplugd").rc != 0
    assert vm.exec("dpkg-query -W unplugd").rc != 0
    assert vm.exec("test -e /etc/systemd/system/multi-user.target.wants/unplugd.service").rc != 0
