"""What the soak benchmark (benchmarks/soak.py) measures besides requests: RSS, open fds, threads
and CPU of each process, sampled from /proc once a second, with the growth fitted over the second
half of the run; and how much the daemon wrote to its stderr.
"""

import collections
import os
import re
import threading
import time

# "Flat" after warm-up: growth over the fitted second half below these.
FLAT = {"rss_mib": 8.0, "fds": 8.0, "threads": 2.0}


def proc_sample(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/stat") as f:
            ticks = f.read().rsplit(")", 1)[1].split()[11:13]  # utime, stime
        return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_s": sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK")}
    except (OSError, KeyError, ValueError):
        return None


class Sampler(threading.Thread):
    """Samples every process in ``pids`` once a second (a thread: a busy event loop cannot delay it)."""

    def __init__(self, pids: dict[str, int], t0: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.pids, self.t0, self.stop = pids, t0, threading.Event()
        self.samples: dict[str, list[tuple[float, dict]]] = {name: [] for name in pids}

    def run(self) -> None:
        while not self.stop.wait(1.0):
            for name, pid in self.pids.items():
                s = proc_sample(pid)
                if s is not None:
                    self.samples[name].append((time.monotonic() - self.t0, s))

    def summary(self, end: float) -> dict:
        out = {}
        for name, rows in self.samples.items():
            half = [(t, s) for t, s in rows if t >= end / 2]
            out[name] = {"cpu_s": round(rows[-1][1]["cpu_s"] - rows[0][1]["cpu_s"], 2) if rows else None,
                         # every 10th sample, for the eye: [t, rss_mib, fds, threads]
                         "series": [[round(t), round(s["rss_mib"], 1), s["fds"], s["threads"]] for t, s in rows[::10]]}
            for metric in FLAT:
                slope = _slope([t for t, _ in half], [s[metric] for _, s in half])  # per second
                span = (half[-1][0] - half[0][0]) if len(half) > 1 else 0.0
                out[name][metric] = {"first": rows[0][1][metric] if rows else None,
                                     "last": rows[-1][1][metric] if rows else None,
                                     "max": max((s[metric] for _, s in rows), default=None),
                                     "slope_per_min": round(slope * 60, 4),
                                     "growth_second_half": round(slope * span, 3),
                                     "flat": abs(slope * span) < FLAT[metric]}
        return out


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def log_summary(path: str) -> dict:
    """How much the daemon wrote to stderr (a log that grows per hostile request grows without limit)."""
    with open(path, "rb") as f:
        text = f.read().decode(errors="replace")
    lines = text.splitlines()
    # The exception lines (what ends each traceback), by kind: what the daemon complained about.
    ends = collections.Counter(line[:120] for line in lines if re.match(r"[\w.]+(Error|Exception|Long):", line))
    return {"bytes": len(text), "lines": len(lines), "tracebacks": text.count("Traceback (most recent call last)"),
            "top_errors": dict(ends.most_common(5))}
