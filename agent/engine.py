"""The readiness engine: run every collector, evaluate, build the Report.

scan() is the only place that knows the order the collectors depend on
(swaps need mounts and block devices; the process scan needs the device
nodes and the sockets). Every collector answers a model.Collected (what it
saw, what it could not read), so each step is one line. A collector that
fails outright does not stop the scan: its failure becomes a ScanProblem
touching every function, so the report says UNKNOWN instead of READY, and
the agent keeps serving.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from unplugd.agent.collectors.block import collect_block, probe_exclusive
from unplugd.agent.collectors.mounts import MountScan, collect_mounts
from unplugd.agent.collectors.net import NetScan, collect_net
from unplugd.agent.collectors.pci import collect_pci, default_pci_ids
from unplugd.agent.collectors.processes import ProcessScan, scan_files_on, scan_processes
from unplugd.agent.collectors.swaps import collect_swaps
from unplugd.agent.errors import AgentError, ReadError
from unplugd.agent.graph import function_disks, is_active
from unplugd.agent.lazylog import Logger
from unplugd.agent.model import (
    BlockDevice,
    Collected,
    DeviceNode,
    DevNo,
    Inventory,
    Mount,
    OpenRef,
    PciFunction,
    ScanProblem,
    Socket,
    Swap,
)
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.reportdata import Data, functions_data, keep_functions, report_data
from unplugd.agent.roots import Roots
from unplugd.agent.selection import select
from unplugd.agent.sysio import beneath, read_text_or, readlink
from unplugd.pci import PciAddress

if TYPE_CHECKING:  # the CLI's JSON (inspect_data) imports no protobuf: ~30 ms of its start
    from unplugd.v1 import report_pb2

__all__ = ["inspect", "inspect_data", "scan"]

log = Logger(__name__)  # imports logging only to log (lazylog)

_T = TypeVar("_T")
_P = ParamSpec("_P")


class _Steps:
    """The problems of one scan, gathered in order from collector after collector.

    A collector that fails outright becomes one more problem, touching everything, and its
    fallback (nothing seen) stands in for its value: the scan goes on, and says UNKNOWN.
    """

    def __init__(self) -> None:
        self.problems: list[ScanProblem] = []

    def __call__(
        self, what: str, fallback: _T, collect: Callable[_P, Collected[_T]], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        try:
            value, problems = collect(*args, **kwargs)
        except AgentError as exc:
            self.problems.append(ScanProblem(what, str(exc)))
            return fallback
        except Exception as exc:  # a collector bug must not make the agent say READY or die
            log.exception("collector %s failed", what)
            self.problems.append(ScanProblem(what, f"internal error: {type(exc).__name__}: {exc}"))
            return fallback
        self.problems.extend(problems)
        return value


def _first_line(roots: Roots, *parts: str) -> str:
    try:
        text = read_text_or(roots.proc.joinpath(*parts), "") or ""
    except ReadError:
        return ""
    return text.splitlines()[0].strip() if text else ""


def scan(roots: Roots, *, own_claims: Collection[str] = (), exclusive_probe: bool = True) -> Inventory:
    """Everything the collectors see under roots, in one Inventory.

    A captured tree is read beneath its base only (sysio.beneath): no link in it leads out.

    own_claims: block devices the agent itself holds with an exclusive open
    (a PrepareUnplug lease); they are not probed, they would answer EBUSY.
    exclusive_probe: False skips the O_EXCL probe ([readiness] in config.toml).
    """
    with beneath(roots):
        return _scan(roots, own_claims, exclusive_probe)


def _scan(roots: Roots, own_claims: Collection[str], exclusive_probe: bool) -> Inventory:
    step = _Steps()
    pci_ids = default_pci_ids()
    functions = step("PCI devices", [], collect_pci, roots, pci_ids)
    block = step("block devices", {}, collect_block, roots)
    ms = step("mounts", MountScan(mounts=[], own_namespace=0, root_devno=None), collect_mounts, roots)
    swaps = step("swaps", [], collect_swaps, roots, ms.mounts, block, ms.own_namespace)
    net = step("network", NetScan({}, [], []), collect_net, roots)

    wanted = _wanted_nodes(block, [n for f in functions for n in f.device_nodes])
    inodes = [s.inode for s in net.sockets if s.inode and is_active(s)]
    ps = step("processes", ProcessScan([]), scan_processes, roots, wanted, inodes, _device_dirs(ms.mounts))
    sockets = _with_owners(net.sockets, ps.socket_owners)
    open_refs = _without_own_claims(roots, ps.open_refs, [block[n].devno for n in own_claims if n in block])

    disks = _idle_disks(functions, block, ms.mounts, swaps) if exclusive_probe else []
    busy = step("exclusive-open probe", frozenset(), probe_exclusive, roots, disks, own_claims)
    if busy:
        # Held, yet no mount, swap or holder shows it: a filesystem detached from every mount table
        # that an open file keeps alive. Name whoever holds a file of it (only for such disks: this
        # stat()s every fd).
        on = {block[n].devno for n in block if n in busy or block[n].parent in busy}
        open_refs += step("open files", [], scan_files_on, roots, on)

    return Inventory(
        functions=tuple(functions),
        block_devices=dict(block),
        mounts=tuple(ms.mounts),
        swaps=tuple(swaps),
        open_refs=tuple(open_refs),
        interfaces=dict(net.interfaces),
        routes=tuple(net.routes),
        sockets=tuple(sockets),
        root_devno=ms.root_devno,
        mount_namespace=ms.own_namespace,
        exclusive_busy=busy,
        problems=tuple(step.problems),
        hostname=_first_line(roots, "sys", "kernel", "hostname"),
        kernel=_first_line(roots, "sys", "kernel", "osrelease"),
        live=roots.live,
    )


def _device_dirs(mounts: Sequence[Mount]) -> frozenset[str]:
    """Mount points of devtmpfs in every namespace: where a device node may be opened (a /dev bound
    elsewhere, or one node bound onto a file), so where an fd's link text may name one."""
    return frozenset(m.mount_point for m in mounts if m.fstype == "devtmpfs")


def _idle_disks(
    functions: Sequence[PciFunction], block: Mapping[str, BlockDevice], mounts: Sequence[Mount], swaps: Sequence[Swap]
) -> list[BlockDevice]:
    """The functions' disks that no mount, swap or holder shows in use: the ones worth probing.

    The probe claims each disk for a few microseconds; a mount racing with it would fail with
    EBUSY. So only disks with no visible user are probed: for the others the mounts, swaps and
    holders already explain an EBUSY.
    """
    used_devnos = {m.devno for m in mounts} | {s.devno for s in swaps if s.devno is not None}
    in_use: set[str] = set()
    for dev in block.values():
        if dev.holders or dev.devno in used_devnos:
            in_use.add(dev.parent or dev.name)
    disks = function_disks(functions, block)
    wanted = dict.fromkeys(d for f in functions for d in disks[f.address] if d in block and d not in in_use)
    return [block[d] for d in wanted]


def _with_owners(sockets: Sequence[Socket], owners: Mapping[int, Sequence[tuple[int, str]]]) -> list[Socket]:
    """Each socket with the pids that hold it (by inode), as the process scan found them."""
    return [
        s._replace(pids=tuple(sorted({pid for pid, _ in owners[s.inode]}))) if s.inode in owners else s for s in sockets
    ]


def _without_own_claims(roots: Roots, refs: Sequence[OpenRef], claimed: Sequence[DevNo]) -> list[OpenRef]:
    """Drop the agent's own lease fds: a leased disk is LEASED, not held open by the agent."""
    if not claimed:
        return list(refs)
    try:
        me = int(readlink(roots.proc / "self"))
    except (ReadError, ValueError):
        return list(refs)
    wanted = set(claimed)
    return [r for r in refs if not (r.pid == me and r.kind == "block" and r.devno in wanted)]


def _wanted_nodes(block: Mapping[str, BlockDevice], nodes: Sequence[DeviceNode]) -> list[DeviceNode]:
    """Every block device's node plus the functions' own nodes, each once."""
    out = {(bd.devno, "block"): DeviceNode(f"/dev/{bd.name}", bd.devno, "block") for bd in block.values()}
    for node in nodes:
        out.setdefault((node.devno, node.kind), node)
    return list(out.values())


def functions(roots: Roots) -> report_pb2.Report:
    """The PCI functions alone, unjudged (GetReportRequest.functions_only): the PCI scan, no other."""
    from unplugd.agent.report import from_data

    step = _Steps()
    with beneath(roots):
        found = step("PCI devices", [], collect_pci, roots, default_pci_ids())
        inventory = Inventory(
            functions=tuple(found),
            problems=tuple(step.problems),
            hostname=_first_line(roots, "sys", "kernel", "hostname"),
            kernel=_first_line(roots, "sys", "kernel", "osrelease"),
            live=roots.live,
        )
    return from_data(functions_data(inventory))


def inspect(
    roots: Roots,
    devices: Sequence[str] = (),
    *,
    leased: Mapping[PciAddress, str] = {},
    own_claims: Collection[str] = (),
    exclusive_probe: bool = True,
) -> report_pb2.Report:
    """inspect_data as the Report message the agent serves."""
    from unplugd.agent.report import from_data

    return from_data(
        inspect_data(roots, devices, leased=leased, own_claims=own_claims, exclusive_probe=exclusive_probe)
    )


def inspect_data(
    roots: Roots,
    devices: Sequence[str] = (),
    *,
    leased: Mapping[PciAddress, str] = {},
    own_claims: Collection[str] = (),
    exclusive_probe: bool = True,
) -> Data:
    """scan + evaluate + report_data, keeping only the functions `devices` name (all for none).

    UnknownDevice when a name matches nothing. Named devices are judged with
    the rest of their slots, and a bridge with what is behind it: the verdicts
    are those of the full report.
    """
    inventory = scan(roots, own_claims=own_claims, exclusive_probe=exclusive_probe)
    chosen = select(inventory, devices)
    # Named devices: verdicts only for their slots (evaluate reads what else they depend on).
    data = report_data(inventory, evaluate(inventory, leased, only={f.address for f in chosen} if devices else None))
    if devices:
        data = keep_functions(data, {str(f.address) for f in chosen})
    return data
