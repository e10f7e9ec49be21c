"""Per-round times of each side of a comparison, the ratios between them, and the text table."""

from __future__ import annotations

import statistics


class Comparison:
    """Sides timed round by round on the same bytes; ``pair(a, b)`` reports a's speed over b's
    per round (b's seconds / a's seconds: > 1 means a is faster), median and range."""

    def __init__(self, name: str, nbytes: int, what: str):
        self.name, self.bytes, self.what = name, nbytes, what
        self.times: dict[str, list[float]] = {}
        self.notes: dict[str, str] = {}
        self.checks: dict[str, list[bool]] = {}
        self.pairs: list[tuple[str, str]] = []
        self.skipped: dict[str, str] = {}
        self.bytes_of: dict[str, int] = {}  # sides that move another byte count (a payload's own)

    def note(self, side: str, text: str) -> None:
        self.notes[side] = text

    def pair(self, a: str, b: str) -> None:
        self.pairs.append((a, b))

    def add(self, side: str, seconds: float) -> None:
        self.times.setdefault(side, []).append(seconds)

    def verified(self, side: str, ok: bool) -> None:
        self.checks.setdefault(side, []).append(bool(ok))

    def skip(self, peer: str, why: str) -> None:
        self.skipped.setdefault(peer, why)

    def ratios(self) -> list[dict]:
        out = []
        for a, b in self.pairs:
            ta, tb = self.times.get(a), self.times.get(b)
            if not ta or not tb:
                continue
            per_round = [y / x for x, y in zip(ta, tb)]  # rounds are paired in order
            out.append({"a": a, "b": b, "median": round(statistics.median(per_round), 3),
                        "min": round(min(per_round), 3), "max": round(max(per_round), 3),
                        "rounds": [round(r, 3) for r in per_round]})
        return out

    def to_dict(self) -> dict:
        sides = {}
        for side, times in self.times.items():
            nbytes = self.bytes_of.get(side, self.bytes)
            med = statistics.median(times)
            sides[side] = {"median_s": round(med, 5), "gbps": round(nbytes / med / 1e9, 3),
                           "rounds_s": [round(t, 5) for t in times], "bytes": nbytes,
                           "what": self.notes.get(side, ""),
                           "checked_equal": self.checks.get(side)}
        return {"name": self.name, "bytes": self.bytes, "what": self.what, "sides": sides,
                "notes": {k: v for k, v in self.notes.items() if k not in sides},
                "ratios": self.ratios(), "skipped": self.skipped}


def render(cmp: Comparison) -> str:
    d = cmp.to_dict()
    lines = [f"== {d['name']}: {d['bytes'] / 2**30:.3f} GiB ({d['what']})",
             f"  {'side':26}{'median s':>10}{'GB/s':>8}  rounds  what it verifies / syncs"]
    for side, s in d["sides"].items():
        check = s["checked_equal"]
        mark = "" if check is None else ("  [bytes equal]" if all(check) else "  [BYTES DIFFER]")
        lines.append(f"  {side:26}{s['median_s']:>10.4f}{s['gbps']:>8.2f}  {len(s['rounds_s']):>6}  {s['what']}{mark}")
    for key, text in cmp.notes.items():
        if key not in d["sides"]:  # notes on the comparison itself (e.g. whether the values match)
            lines.append(f"  {key}: {text}")
    for r in d["ratios"]:
        lines.append(f"  {r['a']} / {r['b']}: {r['median']:.2f}x (range {r['min']:.2f}-{r['max']:.2f})")
    for peer, why in d["skipped"].items():
        lines.append(f"  skipped {peer}: {why}")
    return "\n".join(lines)
