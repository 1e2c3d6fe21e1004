"""Leases mean what they say: refused over a device in use, renewed only by a valid request, ids kept secret."""

from __future__ import annotations

import logging
import secrets
import socket
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from tests.unit.rpc_fakes import DISK_FN, NIC_FN, FakeEngine, FakeLinks, running_server
from unplugd.agent.errors import ClaimConflict, InvalidArgument, LeaseNotFound
from unplugd.agent.model import Address, BlockDevice, Inventory, Mount, NetInterface, OpenRef
from unplugd.agent.mutations import leases as leases_mod
from unplugd.agent.mutations.claims import Claim
from unplugd.agent.mutations.leases import LeaseManager, targets_for
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.errors import REASON_METADATA_KEY
from unplugd.leaselabel import lease_label
from unplugd.v1 import agent_service_pb2 as pb


def _code(call: object) -> grpc.StatusCode:
    code: grpc.StatusCode = cast(Any, call).code()
    return code


def _details(call: object) -> str:
    return str(cast(Any, call).details() or "")


def _reasons(call: object) -> list[str]:
    return [str(v) for k, v in cast(Any, call).trailing_metadata() or () if k == REASON_METADATA_KEY]


def _fake_claim(roots: Roots, disk: BlockDevice) -> Claim:
    return Claim(disk.name, disk.devno, -1)


def _manager() -> LeaseManager:
    return LeaseManager(Roots.under(Path("/nonexistent")), claim=_fake_claim)


def _inventory(**kw: object) -> Inventory:
    return FakeEngine().inventory._replace(**kw)  # type: ignore[arg-type]


_ETH1_DOWN = NetInterface("eth1", 3, admin_up=False, operstate="down", carrier=None)
_MOUNT = Mount(40, 1, (254, 17), "/", "/srv/data", "ext4", "/dev/vdb1", "rw")
_OPEN = OpenRef(812, "dd", (254, 16), "block", "/dev/vdb", 3)
_DM = BlockDevice("dm-0", "dm", (253, 0), 1 << 29, dm_name="vg-lv", dm_uuid="LVM-x")


# -- refused over what the report shows in use ------------------------------------------


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"mounts": (_MOUNT,)}, "mounted on /srv/data"),
        ({"open_refs": (_OPEN,)}, "pid 812 (dd) holds /dev/vdb"),
    ],
)
def test_lease_refused_on_a_disk_in_use(extra: dict[str, object], why: str) -> None:
    """A claim the kernel would grant (an fd held open does not stop O_EXCL) is refused all the same."""
    inv = _inventory(interfaces={"eth1": _ETH1_DOWN}, **extra)
    with pytest.raises(ClaimConflict) as err:
        targets_for(inv, [f for f in inv.functions if f.address == DISK_FN])
    assert len(err.value.reasons) == 1 and why in err.value.reasons[0]
    assert err.value.reasons[0].startswith(f"{DISK_FN} is in use: ")


def test_lease_refused_on_a_disk_with_a_holder_above_a_partition() -> None:
    disks = dict(FakeEngine().inventory.block_devices)
    disks["vdb1"] = disks["vdb1"]._replace(holders=("dm-0",))
    disks["dm-0"] = _DM._replace(slaves=("vdb1",))
    inv = _inventory(block_devices=disks, interfaces={"eth1": _ETH1_DOWN})
    with pytest.raises(ClaimConflict) as err:
        targets_for(inv, inv.functions)
    assert [r.split(": ", 1)[0] for r in err.value.reasons] == [f"{DISK_FN} is in use"]
    assert "vdb -> vdb1 -> dm-0" in err.value.reasons[0]


def test_idle_functions_are_leased() -> None:
    inv = _inventory(interfaces={"eth1": _ETH1_DOWN})
    targets = targets_for(inv, inv.functions)
    assert [(t.function, [d.name for d in t.disks], t.interfaces) for t in targets] == [
        (DISK_FN, ["vdb"], ()),
        (NIC_FN, [], ("eth1",)),
    ]
    # Only what the report calls in use refuses: no hotplug driver is not use.
    no_slot = _inventory(
        interfaces={"eth1": _ETH1_DOWN}, functions=tuple(f._replace(hotplug_slot=None) for f in inv.functions)
    )
    assert len(targets_for(no_slot, no_slot.functions)) == 2


def test_an_interface_only_up_is_leased_when_the_lease_sets_it_down() -> None:
    up = _ETH1_DOWN._replace(admin_up=True, operstate="up")
    inv = _inventory(interfaces={"eth1": up})
    nic = [f for f in inv.functions if f.address == NIC_FN]
    with pytest.raises(ClaimConflict, match="eth1 is administratively up"):
        targets_for(inv, nic)
    assert [t.function for t in targets_for(inv, nic, take_interfaces_down=True)] == [NIC_FN]
    # An address still counts: setting the link down does not remove it.
    addressed = _inventory(interfaces={"eth1": up._replace(addresses=(Address(socket.AF_INET, "10.0.0.5", 24),))})
    with pytest.raises(ClaimConflict, match=r"eth1 has 10\.0\.0\.5/24"):
        targets_for(addressed, nic, take_interfaces_down=True)


def test_service_refuses_a_lease_over_a_device_in_use(tmp_path: Path) -> None:
    engine = FakeEngine()
    up = NetInterface(
        "eth1", 3, admin_up=True, operstate="up", carrier=True, addresses=(Address(socket.AF_INET, "10.0.0.5", 24),)
    )
    engine.inventory = engine.inventory._replace(interfaces={"eth1": up})
    links = FakeLinks(up={"eth1"})
    with running_server(tmp_path, engine, mutations=True, links=links) as (server, stub):
        with pytest.raises(grpc.RpcError) as err:
            stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=["eth1"], take_interfaces_down=True), timeout=5)
        assert _code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert "eth1 has 10.0.0.5/24" in _details(err.value)
        meta = _reasons(err.value)
        assert meta and all(m.startswith(f"{NIC_FN} is in use") for m in meta)
        assert server.leases.leased() == {} and links.log == []


# -- renewal: all or nothing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (pb.PrepareUnplugRequest(devices=["vdb"]), grpc.StatusCode.INVALID_ARGUMENT),  # other devices
        (pb.PrepareUnplugRequest(devices=["eth1", "nosuch0"]), grpc.StatusCode.NOT_FOUND),  # one name unknown
        (pb.PrepareUnplugRequest(devices=["eth1", "bad\x07"]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PrepareUnplugRequest(devices=["eth1"], take_interfaces_down=True), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_a_partly_invalid_renewal_renews_nothing(
    tmp_path: Path, bad: pb.PrepareUnplugRequest, code: grpc.StatusCode
) -> None:
    engine = FakeEngine()
    engine.inventory = engine.inventory._replace(interfaces={"eth1": _ETH1_DOWN})
    with running_server(tmp_path, engine, mutations=True) as (server, stub):
        grant = stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=["eth1"], lease_seconds=30), timeout=5)
        before = server.leases.get(grant.lease_id).expires_at
        request = pb.PrepareUnplugRequest()
        request.CopyFrom(bad)
        request.lease_id, request.lease_seconds = grant.lease_id, 600
        with pytest.raises(grpc.RpcError) as err:
            stub.PrepareUnplug(request, timeout=5)
        assert _code(err.value) == code
        assert server.leases.get(grant.lease_id).expires_at == before
        # The same renewal, valid, goes through.
        ok = stub.PrepareUnplug(
            pb.PrepareUnplugRequest(lease_id=grant.lease_id, devices=["eth1"], lease_seconds=600), timeout=5
        )
        assert server.leases.get(grant.lease_id).expires_at > before and ok.lease_id == grant.lease_id


def test_renewal_checks_happen_under_the_manager_too() -> None:
    mgr = _manager()
    inv = _inventory(interfaces={"eth1": _ETH1_DOWN})
    grant = mgr.prepare(targets_for(inv, inv.functions), 30)
    for kw in ({"functions": {DISK_FN}}, {"take_interfaces_down": True}):
        with pytest.raises(InvalidArgument):
            mgr.renew(grant.lease_id, 600, **kw)
        assert mgr.get(grant.lease_id).expires_at == grant.expires_at
    assert mgr.renew(grant.lease_id, 600, functions={DISK_FN, NIC_FN}).expires_at > grant.expires_at
    mgr.release_all()


# -- ids are credentials ---------------------------------------------------------------------


def test_lease_ids_appear_in_no_report_error_info_or_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    engine = FakeEngine()
    engine.inventory = engine.inventory._replace(interfaces={"eth1": _ETH1_DOWN})
    with running_server(tmp_path, engine, mutations=True) as (server, stub):
        grant = stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=["eth1"]), timeout=5)
        secret = grant.lease_id
        assert len(secret) >= 32
        seen: list[str] = []
        report = stub.GetReport(pb.GetReportRequest(), timeout=5).report
        seen.append(str(report))
        leased = [r for f in report.functions for r in f.reasons if "leased" in r.detail]
        assert leased and lease_label(secret) in leased[0].detail  # the label, which the holder can match
        seen.append(str(stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=5)))
        with pytest.raises(grpc.RpcError) as err:  # already leased: names the lease by its label
            stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=["eth1"]), timeout=5)
        seen += [_details(err.value), str(_reasons(err.value))]
        assert lease_label(secret) in _details(err.value)
        for wrong in (secret[:-1] + ("0" if secret[-1] != "0" else "1"), secret + "x"):
            with pytest.raises(grpc.RpcError) as err:
                stub.ReleaseUnplug(pb.ReleaseUnplugRequest(lease_id=wrong), timeout=5)
            assert _code(err.value) == grpc.StatusCode.NOT_FOUND
            seen.append(_details(err.value))
        assert server.leases.leased() == {NIC_FN: lease_label(secret)}
        stub.PrepareUnplug(pb.PrepareUnplugRequest(lease_id=secret), timeout=5)
        stub.ReleaseUnplug(pb.ReleaseUnplugRequest(lease_id=secret), timeout=5)
    seen += [r.getMessage() + " " + str(vars(r)) for r in caplog.records]
    assert any("lease released" in s for s in seen)
    assert not [s for s in seen if secret in s]


def test_only_the_whole_id_opens_a_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when labels collide, the full id is compared: a lease is ended only by its holder."""
    monkeypatch.setattr(leases_mod, "lease_label", lambda lease_id: "same")
    mgr = _manager()
    inv = _inventory(interfaces={"eth1": _ETH1_DOWN})
    grant = mgr.prepare(targets_for(inv, [f for f in inv.functions if f.address == NIC_FN]))
    for wrong in ("", "same", grant.lease_id[:-1], grant.lease_id.upper()):
        with pytest.raises(LeaseNotFound):
            mgr.release(wrong)
        with pytest.raises(LeaseNotFound):
            mgr.renew(wrong)
    assert mgr.leased() == {NIC_FN: "same"}
    mgr.release(grant.lease_id)
    assert mgr.leased() == {}


def test_leased_report_reason_carries_the_label() -> None:
    mgr = _manager()
    inv = _inventory(interfaces={"eth1": _ETH1_DOWN})
    grant = mgr.prepare(targets_for(inv, [f for f in inv.functions if f.address == NIC_FN]))
    (verdict,) = [v for v in evaluate(inv, mgr.leased()) if v.address == NIC_FN]
    (reason,) = [r for r in verdict.reasons if r.code.value == "LEASED"]
    assert grant.lease_id not in f"{reason.detail} {reason.object}"
    assert reason.object == lease_label(grant.lease_id)
    mgr.release_all()


def test_two_live_leases_never_share_a_label(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = iter(["a" * 32, "a" + "b" * 31, "b" * 32])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(ids))
    monkeypatch.setattr(leases_mod, "lease_label", lambda lease_id: lease_id[:1])
    mgr = _manager()
    inv = _inventory(interfaces={"eth1": _ETH1_DOWN})
    first = mgr.prepare(targets_for(inv, [f for f in inv.functions if f.address == DISK_FN]))
    second = mgr.prepare(targets_for(inv, [f for f in inv.functions if f.address == NIC_FN]))
    assert (first.lease_id, second.lease_id) == ("a" * 32, "b" * 32)  # the colliding id was drawn again
    assert mgr.leased() == {DISK_FN: "a", NIC_FN: "b"}
    mgr.release(first.lease_id)
    mgr.release(second.lease_id)
    assert mgr.leased() == {}
