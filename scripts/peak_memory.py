"""Peak memory of a command, for scripts/data_scale.py: `measure` runs it and reports the largest resident set of
any one of its processes (`ru_maxrss` from `os.wait4`, as Linux reports it: the process and each child it reaped,
not their sum) and the largest sum over all of them, sampled from /proc as PSS (shared pages counted once).

Linux keeps a process's peak RSS across exec, and a child forked (or vforked) from a process starts with that
process's peak: a command started straight from a Python that holds torch and models would report the caller's
peak whenever its own is lower. So a bare Python, importing nothing, forks the command and reports its ru_maxrss.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

MIB = 1024 * 1024
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(argv: list[str], log: Path, cwd: Path, env: dict[str, str]) -> dict:
    """Run `argv` (its first item a path to an executable) in `cwd`, stdout and stderr to `log`: its exit code,
    wall seconds, peak RSS of its largest process, and peak PSS of all its processes, in all and anonymous only
    (the memory they own, without the file pages of memory-mapped data, which the kernel may drop), in MiB."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = log.with_suffix(".maxrss")
    peak.unlink(missing_ok=True)
    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(peak), *argv], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        sampler = _TreeMemory(proc.pid)
        sampler.start()
        proc.wait()
        seconds = time.perf_counter() - started
        sampler.finished.set()
        sampler.join()
    rss = int(peak.read_text()) / 1024 if peak.is_file() else float("nan")      # ru_maxrss is in KiB on Linux
    return {"returncode": proc.returncode, "wall_s": seconds, "peak_rss_mib": rss,
            "all_processes_pss_mib": sampler.peak / MIB, "all_processes_anon_pss_mib": sampler.peak_anon / MIB}


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue                                            # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _pss(pid: int) -> tuple[int, int]:
    """(PSS, anonymous PSS) of a process in bytes; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    found = [re.search(rf"^{key}:\s+(\d+) kB", text, re.M) for key in ("Pss", "Pss_Anon")]
    return tuple(int(f.group(1)) * 1024 if f else 0 for f in found)


class _TreeMemory(threading.Thread):
    """The largest PSS, and anonymous PSS, summed over the descendants of a process, sampled every `interval`
    seconds."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.finished = pid, interval, threading.Event()
        self.peak = self.peak_anon = 0

    def run(self) -> None:
        while not self.finished.wait(self.interval):
            sizes = [_pss(p) for p in _tree(self.pid)[1:]]                               # [0]: the launcher
            self.peak = max(self.peak, sum(s[0] for s in sizes))
            self.peak_anon = max(self.peak_anon, sum(s[1] for s in sizes))
