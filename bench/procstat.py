"""/proc accounting: CPU time and RSS of a process tree, machine-wide CPU, sockets per process.

Kept apart from the code that starts processes so that the parsing can be unit-tested on
recorded /proc text (tests/test_bench_parsing.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class StatLine:
    """The fields of /proc/<pid>/stat the bench uses."""

    ppid: int
    ticks: int  # utime + stime + cutime + cstime: reaped children stay counted in the parent


def parse_stat(raw: str) -> StatLine:
    """One /proc/<pid>/stat line; the command name may hold spaces and parentheses."""
    rest = raw[raw.rfind(")") + 2 :].split()  # rest[i] is field i + 3 of proc(5)
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return StatLine(ppid=int(rest[1]), ticks=ticks)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process exited between listdir and open
        return None


def proc_table() -> dict[int, StatLine]:
    """pid -> StatLine for every process visible now."""
    table: dict[int, StatLine] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (raw := _read(f"/proc/{entry}/stat")) is not None:
            table[int(entry)] = parse_stat(raw)
    return table


def tree_of(table: Mapping[int, StatLine], root: int) -> list[int]:
    """`root` and all its descendants present in `table` (nginx master + workers, say)."""
    children: dict[int, list[int]] = {}
    for pid, line in table.items():
        children.setdefault(line.ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            out.append(pid)
            stack.extend(children.get(pid, ()))
    return out


def tree_ticks(root: int) -> dict[int, int]:
    """CPU ticks so far of each process in the tree of `root`."""
    table = proc_table()
    return {pid: table[pid].ticks for pid in tree_of(table, root)}


def ticks_delta(before: Mapping[int, int], after: Mapping[int, int]) -> dict[int, int]:
    """Ticks spent per process between two readings; a process born in between counts from 0."""
    return {pid: t - before.get(pid, 0) for pid, t in after.items()}


def seconds(ticks: int) -> float:
    return ticks / CLK_TCK


def parse_busy(proc_stat: str, cpus: Iterable[int] | None = None) -> int:
    """Busy ticks (all but idle and iowait) from /proc/stat: all CPUs, or only `cpus`."""
    wanted = None if cpus is None else {f"cpu{n}" for n in cpus}
    total = 0
    for line in proc_stat.splitlines():
        if not line.strip():
            continue
        name, *fields = line.split()
        if (name == "cpu") if wanted is None else (name in wanted):
            total += sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))
    return total


def busy_ticks(cpus: Iterable[int] | None = None) -> int:
    return parse_busy(Path("/proc/stat").read_text(), cpus)


def parse_statm_rss(statm: str) -> int:
    """Resident bytes from /proc/<pid>/statm (second field, in pages)."""
    return int(statm.split()[1]) * PAGE_SIZE


def tree_rss(root: int) -> int:
    """Resident bytes of the whole tree (pages shared by master and workers count once each)."""
    total = 0
    for pid in tree_of(proc_table(), root):
        if (raw := _read(f"/proc/{pid}/statm")) is not None:
            total += parse_statm_rss(raw)
    return total


def established_inodes(net_tcp: str, port: int) -> set[int]:
    """Socket inodes of ESTABLISHED connections whose local port is `port` (/proc/net/tcp{,6})."""
    inodes = set()
    for line in net_tcp.splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(int(f[9]))
    return inodes


def connections_per_process(port: int, pids: Iterable[int]) -> dict[int, int]:
    """How many established connections on local `port` each process holds an fd of."""
    inodes: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if (text := _read(name)) is not None:
            inodes |= established_inodes(text, port)
    counts = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        n = 0
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                n += 1
        counts[pid] = n
    return counts
