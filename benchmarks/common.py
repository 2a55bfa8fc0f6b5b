"""Timing and reporting helpers shared by the benchmarks.

CPU: ``time.perf_counter`` around each repeat after warm-up. CUDA: events on
the current stream after warm-up. Both report the median of the repeats.
Inputs are rotated between repeats (``Rotation``) so that a tensor smaller
than the last-level cache is not timed from cache.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import random
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def lscpu_field(name: str) -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def last_level_cache_bytes(default: int = 256 << 20) -> int:
    """L3 size from lscpu (e.g. "480 MiB (1 instance)"), else ``default``."""
    text = lscpu_field("L3 cache")
    m = re.match(r"([\d.]+)\s*([KMG])i?B", text)
    if not m:
        return default
    return int(float(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def machine_description(device: str) -> str:
    lines = [f"date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
                     f"{p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
    model = lscpu_field("Model name") or platform.processor()
    lines.append(f"CPU: {model}, {os.cpu_count()} logical CPUs, L3 {lscpu_field('L3 cache') or '?'}, "
                 f"torch threads {torch.get_num_threads()}")
    lines.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    if hasattr(os, "getloadavg"):
        lines.append("load average at start (1/5/15 min): "
                     + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=os.path.dirname(__file__)).stdout.strip()
        if rev:
            lines.append(f"qvit commit {rev}")
    except (OSError, subprocess.SubprocessError):
        pass
    return "\n".join(lines)


class Rotation:
    """Cycles through ``count`` independent copies of some inputs."""

    def __init__(self, make: Callable[[int], object], count: int):
        self.items = [make(i) for i in range(count)]
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item


def rotation_count(bytes_per_set: int, *, cache_bytes: int, cap: int = 64) -> int:
    """Enough input sets to cover twice the cache, at least 2."""
    return max(2, min(cap, math.ceil(2 * cache_bytes / max(1, bytes_per_set))))


def time_cpu(fn: Callable[[], None], *, warmup: int, repeats: int,
             cpu_times: Optional[List[float]] = None) -> List[float]:
    """Wall times; with ``cpu_times`` also the process CPU time of each repeat.

    CPU time (all threads of this process) does not count time slices lost to
    other processes, so on a loaded machine it is the steadier number; with
    more than one thread it also counts OpenMP threads spinning at barriers.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return times


def time_cuda(fn: Callable[[], None], *, warmup: int, repeats: int) -> List[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def time_rounds(fns: Dict[str, Callable[[], None]], device: str, *, rounds: int,
                per_round: int, cpu_time: bool = False,
                seed: int = 0) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Contenders taking turns: each round runs every contender, in a shuffled
    order, for one untimed call and ``per_round`` timed ones. Returns each
    round's median wall time (and, with ``cpu_time``, process CPU time) per
    contender, rounds in order."""
    rng = random.Random(seed)
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            fn = fns[name]
            if device == "cuda":
                t = time_cuda(fn, warmup=1, repeats=per_round)
            elif cpu_time:
                c: List[float] = []
                t = time_cpu(fn, warmup=1, repeats=per_round, cpu_times=c)
                cpu[name].append(median(c))
            else:
                t = time_cpu(fn, warmup=1, repeats=per_round)
            wall[name].append(median(t))
    return wall, {k: v for k, v in cpu.items() if v}


def paired(num: List[float], den: List[float]) -> float:
    """Median over rounds of num/den, the two timed in the same round."""
    return median([a / b for a, b in zip(num, den)])
