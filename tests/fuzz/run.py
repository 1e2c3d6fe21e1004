"""`make fuzz`: a bounded coverage-guided run of every target in tests/fuzz/targets.py.

With atheris (libFuzzer for Python, `pip install atheris`) each target runs in
its own process for its share of the time budget, instrumented, from a small
seed corpus of what the kernel really writes; without it, the same targets run
under hypothesis for the same time (random, not coverage-guided: the output
says which one ran). Prints executions and crashes per target; exit 1 when any
target crashed, with the input that did it under .fuzz/crashes/.

    .venv/bin/python tests/fuzz/run.py --seconds 60
    .venv/bin/python tests/fuzz/run.py --seconds 30 --target mountinfo
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CRASHES = REPO / ".fuzz" / "crashes"

# What each parser meets in real life: the fuzzer mutates from here instead of from nothing.
SEEDS: dict[str, list[bytes]] = {
    "mountinfo": [
        b"36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n",
        b"21 1 252:17 / /mnt/a\\040b\\012\xff rw,relatime shared:1 - ext4 /dev/vdb1 rw\n",
    ],
    "swaps": [b"Filename\tType\tSize\tUsed\tPriority\n/dev/vdb2    partition\t1048572\t0\t-2\n"],
    "proc_net": [
        b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        b"   0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1\n"
    ],
    "uevent": [b"MAJOR=252\nMINOR=16\nDEVNAME=vdb\nDEVTYPE=disk\n"],
    "netlink_json": [
        b'{"version": 1, "links": [{"ifname": "eth1", "ifindex": 2, "kind": ""}], "addresses": '
        b'[{"ifname": "eth1", "family": 4, "address": "192.0.2.1", "prefixlen": 24}], "routes": '
        b'[{"family": 4, "destination": "0.0.0.0/0", "gateway": "192.0.2.254", "ifname": "eth1"}]}'
    ],
    "devno": [b"252:16\n"],
    "pci": [b"0000:00:06.1", b"0000:00/03.0/05.0"],
    "treetext": [b"# treetext 1\ndir sys/block/vda/holders\nfile proc/1/comm noeol\n|init\nlink sys/x -> ../y\n"],
    "text": [b"/mnt/\n\x1b[31m\xff\\"],
}


def _seeds(name: str) -> list[bytes]:
    """SEEDS, plus the binary ones built by the code that writes them (in the parent only: the
    fuzzing child must import the parsers under instrumentation first)."""
    if name == "framing":
        from unplugd.framing import Frame, FrameKind, encode_frame, sync_preamble

        return [
            encode_frame(Frame(FrameKind.DATA, 1, b"abc")),
            sync_preamble()[:64] + encode_frame(Frame(FrameKind.CLOSE, 7, b"bye")),
        ]
    if name == "rtnetlink":
        import struct

        name_attr = struct.pack("=HH", 9, 3) + b"eth1\0" + b"\0" * 3  # IFLA_IFNAME, padded to 4
        payload = struct.pack("=BxHiII", 0, 1, 2, 0x1003, 0) + name_attr
        return [struct.pack("=IHHII", 16 + len(payload), 16, 2, 1, 0) + payload]  # RTM_NEWLINK
    return SEEDS.get(name, [])


# A fuzzing child spends this long importing the parsers under instrumentation before it runs.
_STARTUP_SECONDS = 2
_BATCH = 500  # hypothesis examples per batch of the fallback: small enough to stop near the deadline
_STAT = re.compile(r"stat::number_of_executed_units:\s*(\d+)")


def _have_atheris() -> bool:
    try:
        import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def _child(name: str, argv: list[str]) -> None:
    """Inside the fuzzing process: instrument the parsers, then hand over to libFuzzer."""
    import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

    with atheris.instrument_imports():
        from tests.fuzz.targets import TARGETS
    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *argv], target)
    atheris.Fuzz()


def _run_atheris(name: str, seconds: int) -> tuple[int, int]:
    CRASHES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"unplugd-fuzz-{name}-") as corpus:
        for i, seed in enumerate(_seeds(name)):
            (Path(corpus) / f"seed{i}").write_bytes(seed)
        argv = [
            sys.executable,
            __file__,
            "--child",
            name,
            corpus,
            f"-max_total_time={seconds}",
            "-print_final_stats=1",
            f"-artifact_prefix={CRASHES}/{name}-",
            "-max_len=4096",
        ]
        out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=seconds + 60)
    runs = sum(int(n) for n in _STAT.findall(out.stderr))
    crashed = out.returncode != 0
    if crashed:
        sys.stderr.write(out.stderr[-4000:])
    return runs, int(crashed)


def _run_hypothesis(name: str, seconds: int) -> tuple[int, int]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.fuzz.targets import TARGETS

    target = TARGETS[name]
    runs = 0

    # Batches of independent runs until the time is up: each batch draws fresh random inputs.
    @settings(max_examples=_BATCH, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=4096), st.sampled_from(_seeds(name) or [b""])))
    def batch(data: bytes) -> None:
        nonlocal runs
        runs += 1
        target(data)

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            batch()
        except Exception as exc:  # hypothesis printed the shrunk failing input above
            sys.stderr.write(f"{name}: {type(exc).__name__}: {exc}\n")
            return runs, 1
    return runs, 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO))
        _child(sys.argv[2], sys.argv[3:])
        return 0
    sys.path.insert(0, str(REPO))
    from tests.fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="total budget, shared by the targets (default 60)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these (repeatable)")
    parser.add_argument(
        "--engine",
        choices=["auto", "hypothesis"],
        default="auto",
        help="hypothesis: skip atheris even when it is installed",
    )
    args = parser.parse_args()
    atheris = _have_atheris() and args.engine == "auto"
    names = args.target or sorted(TARGETS)
    deadline = time.monotonic() + args.seconds
    each = max(1, args.seconds // len(names) - _STARTUP_SECONDS)
    engine = (
        "atheris (coverage-guided)"
        if atheris
        else "hypothesis, random and not coverage-guided"
        + ("" if _have_atheris() else " (atheris is not installed: pip install atheris)")
    )
    print(f"fuzzing {len(names)} target(s) in about {args.seconds} s ({each} s each), with {engine}")
    failed = 0
    for i, name in enumerate(names):
        # the budget is wall-clock for the whole run: each target gets what is left, shared
        each = max(1, int((deadline - time.monotonic()) / (len(names) - i)) - _STARTUP_SECONDS)
        runs, crashes = _run_atheris(name, each) if atheris else _run_hypothesis(name, each)
        failed += crashes
        print(f"  {name:<14} {runs:>10,} executions  {crashes} crash(es)", flush=True)
    if failed:
        print(f"{failed} target(s) crashed; inputs under {CRASHES}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
