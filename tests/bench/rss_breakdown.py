"""Where the agent's RSS is: `unplugd serve` on a unix socket, N GetReports, then /proc/PID/smaps by mapping.

    .venv/bin/python -m tests.bench.rss_breakdown [--requests N] [--clients C] [--python /usr/bin/python3]

Groups every mapping's Rss (and its anonymous and clean file-backed parts) by what it maps: each
shared object by name, the heap, anonymous mappings (pymalloc's 1 MiB arenas, malloc's per-thread
arenas, mmap'd blocks), thread stacks (8 MiB after a guard page). It prints them at idle and after
the requests, with the largest anonymous mappings: the section's RSS rows say how much, this says where.
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path

from tests.bench.agent_proc import running_agent
from tests.bench.measure import proc_status_kib

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def smaps_groups(pid: int) -> dict[str, dict[str, int]]:
    """{group: {Rss, Anonymous, Private_Dirty, Shared_Clean+Private_Clean as Clean, count}} in KiB."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    current = ""
    prev_guard = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _HEADER.match(line)
        if m:
            start, end, perms, name = int(m[1], 16), int(m[2], 16), m[3], m[4].strip()
            if name.startswith("/"):
                current = os.path.basename(name)
            elif name:
                current = name
            elif perms == "---p":
                current = "[guard]"
            elif prev_guard and end - start == 8 * 1024 * 1024:
                current = "[anon 8 MiB after a guard: thread stack]"
            elif end - start >= 64 * 1024 * 1024:
                current = "[anon >= 64 MiB: malloc arena]"
            else:
                current = "[anon]"
            prev_guard = perms == "---p"
            groups[current]["count"] += 1
            continue
        key, _, rest = line.partition(":")
        if key in ("Rss", "Anonymous", "Private_Dirty", "Shared_Clean", "Private_Clean", "Swap"):
            kib = int(rest.split()[0])
            groups[current][key] += kib
            if key in ("Shared_Clean", "Private_Clean"):
                groups[current]["Clean"] += kib
    return groups


def print_groups(pid: int, title: str) -> None:
    groups = smaps_groups(pid)
    total = sum(g["Rss"] for g in groups.values())
    print(f"== {title}: VmRSS {proc_status_kib(pid, 'VmRSS') / 1024:.1f} MiB, smaps sum {total / 1024:.1f} MiB")
    print(f"{'mapping':48} {'Rss':>8} {'Anon':>8} {'Clean':>8} {'n':>4}  (KiB)")
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["Rss"]):
        if g["Rss"] >= 64:
            print(f"{name[:48]:48} {g['Rss']:8} {g['Anonymous']:8} {g['Clean']:8} {g['count']:4}")
    anon = sum(g["Anonymous"] for g in groups.values())
    clean = sum(g["Clean"] for g in groups.values())
    print(f"{'total':48} {total:8} {anon:8} {clean:8}")
    print(f"threads: {len(os.listdir(f'/proc/{pid}/task'))}")
    print("largest anonymous mappings (KiB):", ", ".join(str(k) for k in largest_anon(pid)))


def largest_anon(pid: int, n: int = 8) -> list[int]:
    """Rss of the n largest anonymous mappings: malloc's per-thread arenas show up here."""
    sizes: list[int] = []
    anon = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _HEADER.match(line)
        if m:
            anon = not m[4].strip()
        elif anon and line.startswith("Rss:"):
            sizes.append(int(line.split()[1]))
    return sorted(sizes, reverse=True)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=1, help="channels firing at once (each --requests calls)")
    ap.add_argument("--python", default=None, help="run the agent under this interpreter (e.g. /usr/bin/python3)")
    args = ap.parse_args()

    import grpc

    from unplugd.v1 import agent_service_pb2 as pb
    from unplugd.v1 import agent_service_pb2_grpc as pb_grpc

    with running_agent(python=args.python) as agent:
        time.sleep(1.0)
        print_groups(agent.pid, "idle")

        def client() -> None:
            with grpc.insecure_channel(agent.target) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                for _ in range(args.requests):
                    stub.GetReport(pb.GetReportRequest(), timeout=30)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print_groups(agent.pid, f"after {args.clients} x {args.requests} GetReport")


if __name__ == "__main__":
    main()
