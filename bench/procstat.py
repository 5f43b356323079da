"""What a process costs, from /proc: resident memory (private and file-backed), fds, CPU time."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    rss_kb: int
    rss_anon_kb: int
    rss_file_kb: int
    fds: int
    cpu_s: float  # user + system


def proc_stat(pid: int) -> ProcStat:
    status = Path(f"/proc/{pid}/status").read_text()

    def field(name: str) -> int:
        m = re.search(rf"{name}:\s+(\d+)", status)
        return int(m.group(1)) if m else 0

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return ProcStat(field("VmRSS"), field("RssAnon"), field("RssFile"), len(os.listdir(f"/proc/{pid}/fd")), cpu)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and all its live descendants (Triton and its backend stubs)."""
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            total += proc_stat(p).cpu_s
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pids.extend(int(c) for c in children)
    return total
