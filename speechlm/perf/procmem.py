"""Memory of processes seen from outside through /proc: a status file's peak and resident sizes, the ranks under a
deepspeed launcher, the host's available memory and DeepSpeed's shared-memory buffers."""

from __future__ import annotations

import contextlib
import glob
from dataclasses import dataclass
from pathlib import Path

STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmPeak")


def parse_proc_status(text: str) -> dict[str, int]:
    """The memory lines of a ``/proc/<pid>/status`` text, in bytes (``VmHWM:  123 kB`` -> 125952)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key not in STATUS_FIELDS:
            continue
        parts = rest.split()
        if not parts:
            continue
        value = int(parts[0])
        unit = parts[1].lower() if len(parts) > 1 else "b"
        out[key] = value * {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "b": 1}.get(unit, 1)
    return out


def read_proc_status(pid: int) -> dict[str, int] | None:
    try:
        return parse_proc_status(Path(f"/proc/{pid}/status").read_text())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def local_rank_of(cmdline: list[str]) -> int | None:
    """The ``--local_rank=N`` the deepspeed launcher gives each rank (None: not a rank)."""
    for i, arg in enumerate(cmdline):
        if arg.startswith("--local_rank="):
            return int(arg.split("=", 1)[1])
        if arg == "--local_rank" and i + 1 < len(cmdline):
            return int(cmdline[i + 1])
    return None


@dataclass
class RankMemory:
    """What was seen of one rank process (bytes)."""

    pid: int
    local_rank: int
    vm_hwm: int = 0  # kernel's peak RSS of the process, last value read before it exited
    vm_hwm_before_steps: int = 0  # VmHWM when the window opened (load + DeepSpeed init + step 1)
    rss_steps_max: int = 0  # maxima of the samples taken inside the window (steps 2..N)
    anon_steps_max: int = 0
    shmem_steps_max: int = 0
    file_steps_max: int = 0
    samples_in_steps: int = 0


class RankMonitor:
    """Polls the rank processes under a launcher pid (children's children) from outside."""

    def __init__(self, launcher_pid: int):
        self.launcher_pid = launcher_pid
        self.ranks: dict[int, RankMemory] = {}  # pid -> memory

    def discover(self) -> None:
        import psutil

        # exactly two levels down (deepspeed -> launch.py -> ranks): a process a rank forks carries the rank's
        # command line too, and must not count as another rank
        kids = []
        try:
            for child in psutil.Process(self.launcher_pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    kids += child.children()
        except psutil.NoSuchProcess:
            return
        for proc in kids:
            if proc.pid in self.ranks:
                continue
            try:
                rank = local_rank_of(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                continue
            if rank is not None:
                self.ranks[proc.pid] = RankMemory(proc.pid, rank)

    def sample(self, in_steps: bool, window_opened: bool = False) -> None:
        self.discover()
        for mem in self.ranks.values():
            st = read_proc_status(mem.pid)
            if not st or "VmHWM" not in st:
                continue  # exited (its last VmHWM is kept)
            mem.vm_hwm = max(mem.vm_hwm, st["VmHWM"])
            if window_opened:
                mem.vm_hwm_before_steps = st["VmHWM"]
            if in_steps:
                mem.samples_in_steps += 1
                mem.rss_steps_max = max(mem.rss_steps_max, st.get("VmRSS", 0))
                mem.anon_steps_max = max(mem.anon_steps_max, st.get("RssAnon", 0))
                mem.shmem_steps_max = max(mem.shmem_steps_max, st.get("RssShmem", 0))
                mem.file_steps_max = max(mem.file_steps_max, st.get("RssFile", 0))

    def by_rank(self) -> list[RankMemory]:
        return sorted(self.ranks.values(), key=lambda m: m.local_rank)


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def shm_buffers(port: int | None = None) -> list[Path]:
    pat = f"deepspeed_allreduce_buffer_*_{port}_*" if port is not None else "deepspeed_allreduce_buffer_*"
    return [Path(p) for p in glob.glob(f"/dev/shm/{pat}")]


# ============================================================================================ runs
