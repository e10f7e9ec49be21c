"""Congestion-aware rate control for one peer link, in the spirit of BBR.

Inputs: bytes acknowledged (the kernel's ``TCP_INFO`` bytes_acked where available, else the
receiver's chunk acknowledgements), chunk round trips, and ``TCP_INFO`` smoothed and minimum RTT,
retransmissions and D-SACKs (a retransmission the receiver reports as a duplicate was not lost).
Every ``SAMPLE`` seconds :meth:`tick` turns them into a delivery-rate sample (bytes acknowledged
over the last ``RATE_SPAN`` s, less any idle time before a burst); the bottleneck estimate is the
maximum sample of the last ``BW_WINDOW`` seconds. The pacing rate is that estimate times a gain:

- ``startup``: the cap, or ``initial`` (None: no pacing, TCP's slow start finds the rate), then
  2.5x the estimate, until delivery stops growing by 25% per sample or congestion shows;
  a paced link returns to startup once it has been clear of queueing and loss for
  ``CLEAR_AFTER`` seconds while the pacer was the limit (the bottleneck moved or went away).
  "The pacer was the limit" is the sender's own report (:meth:`on_paced`: it waited for the
  pacer), so short transfers with idle gaps between them, whose delivery rate averaged over a
  sample never reaches the pacing rate, are not held at an old estimate for ever;
- ``probe`` 1.25x for one sample in eight, to find bandwidth that was freed;
- ``drain`` 0.85x after a probe, or whenever queueing delay (RTT above 1.5x its minimum + 10 ms) or
  retransmissions appear, so queues the probe built are emptied;
- ``cruise`` 1.0x otherwise.

When delivery stays well under the estimate while queues grow (the link got slower), the
estimate is reset to recent samples at once instead of waiting for the window to expire. The
pacing rate never exceeds the configured cap. With ``adaptive=False`` the rate is the cap.
"""

from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass
from typing import Callable

SAMPLE = 0.1
RATE_SPAN = 0.3
BW_WINDOW = 1.0
RTT_WINDOW = 10.0
STARTUP_GAIN, PROBE_GAIN, DRAIN_GAIN = 2.5, 1.25, 0.85
QUEUE_SLACK = 0.010  # seconds of RTT above 1.5x its minimum that count as a standing queue
CLEAR_AFTER = 2.0  # seconds without queueing or loss before pacing is lifted again
MIN_RATE = 1e6  # bytes/s: never pace slower than 8 Mbit/s, whatever the samples say
CYCLE = (PROBE_GAIN, DRAIN_GAIN, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class LinkSnapshot:
    """What the controller knows about the path; rates in bits per second, times in ms.

    ``available_bps`` is the bottleneck estimate (None before the first sample),
    ``utilisation`` the latest delivery rate over that estimate, ``loss`` the fraction of TCP
    segments lost over the last sample (retransmitted, and not reported back as duplicates).
    """

    time: float
    available_bps: float | None
    pacing_bps: float | None
    cap_bps: float | None
    delivery_bps: float
    utilisation: float
    rtt_ms: float | None
    min_rtt_ms: float | None
    loss: float
    retransmits: int
    inflight_bytes: int
    phase: str

    def to_dict(self) -> dict:
        return asdict(self)


class RateController:
    """Pacing rate for one peer link. Rates given and returned in bytes per second."""

    def __init__(self, cap: float | None, adaptive: bool = True, initial: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cap = cap
        self.adaptive = adaptive
        self.clock = clock
        self._initial = min(initial, cap) if (cap and initial) else (initial or cap)
        self._acked = 0
        self._wire_acked = 0
        self._wire = False
        self._last_tick = clock()
        self._ticks: collections.deque[tuple[float, int]] = collections.deque([(self._last_tick, 0)])
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._bw: float | None = None
        self._delivery = 0.0
        self._rtts: collections.deque[tuple[float, float]] = collections.deque()
        self._srtt: float | None = None
        self._kernel_rtt: float | None = None
        self._kernel_min_rtt: float | None = None
        self._loss = 0.0
        self._retrans_total = 0
        self._retrans_pending = 0  # the last call's retransmissions no D-SACK has explained yet
        self._segs_prev = 0
        self._nacks = 0
        self._phase = "startup" if adaptive else "fixed"
        self._cycle = 0
        self._startup_best = 0.0
        self._startup_flat = 0
        self._last_congested = -1e9
        self._inflight = 0
        self._pacing = self._initial if adaptive else cap
        self._app_limited = False  # idle at some point since the last tick
        self._idle = False
        self._busy_since = self._last_tick  # when the sender last had data again after being idle
        self._paced = False  # the sender waited for the pacer since the last tick

    # -- inputs ---------------------------------------------------------------------------------
    def on_ack(self, nbytes: int, rtt: float | None) -> None:
        self._acked += nbytes
        if rtt is not None and rtt > 0:
            now = self.clock()
            self._rtts.append((now, rtt))
            self._srtt = rtt if self._srtt is None else 0.875 * self._srtt + 0.125 * rtt

    def on_wire_acked(self, nbytes: int) -> None:
        """Bytes the kernel saw acknowledged (``TCP_INFO`` bytes_acked deltas, all connections).

        Finer-grained than chunk acknowledgements, so once reported it is what delivery-rate
        samples are computed from."""
        self._wire_acked += max(0, nbytes)
        self._wire = True

    def on_nack(self) -> None:
        self._nacks += 1

    def on_app_limited(self) -> None:
        """The sender ran out of data to send (prefill has not produced the next layer yet): the
        delivery rate of every interval until :meth:`on_busy` says how fast the application
        was, not the path."""
        self._app_limited = self._idle = True

    def on_busy(self) -> None:
        """The sender has data to send again."""
        if self._idle:
            self._busy_since = self.clock()
        self._idle = False

    def on_paced(self) -> None:
        """The sender had data and a free connection but waited for the pacer: pacing binds."""
        self._paced = True

    def on_tcp_info(self, rtt_s: float | None, min_rtt_s: float | None, retrans_delta: int, segs_delta: int,
                    dsack_delta: int = 0) -> None:
        """Kernel view, summed or averaged by the caller over the peer's connections:
        retransmissions, segments sent and D-SACKs received since the last call.

        A retransmission the receiver reports as a duplicate (D-SACK) was not lost: the original
        arrived, only its acknowledgement came late (on a sub-millisecond path a busy receiver
        host delays ACKs past the tail-loss probe's timer; on loopback every retransmission was
        such a probe). Counting those as loss put a clear path into drain and paced it below its
        rate. A D-SACK comes back about a round trip after its retransmission, so a call's
        retransmissions count as loss only when the next call has not explained them."""
        if rtt_s:
            self._kernel_rtt = rtt_s
        if min_rtt_s:
            self._kernel_min_rtt = min_rtt_s
        retrans_delta, dsack_delta = max(0, retrans_delta), max(0, dsack_delta)
        self._retrans_total += retrans_delta
        from_pending = min(dsack_delta, self._retrans_pending)  # D-SACKs explain the oldest first
        lost = self._retrans_pending - from_pending
        self._retrans_pending = max(0, retrans_delta - (dsack_delta - from_pending))
        self._loss = lost / self._segs_prev if self._segs_prev > 0 else 0.0
        self._segs_prev = segs_delta

    # -- estimates ------------------------------------------------------------------------------
    @property
    def min_rtt(self) -> float | None:
        if self._kernel_min_rtt:
            return self._kernel_min_rtt
        return min((r for _, r in self._rtts), default=None)

    @property
    def rtt(self) -> float | None:
        return self._kernel_rtt or self._srtt

    @property
    def bottleneck(self) -> float | None:
        return self._bw

    def pacing_rate(self) -> float | None:
        """Bytes per second to pace at now, or None for no pacing at all."""
        return self._pacing

    def _queueing(self) -> bool:
        rtt, floor = self.rtt, self.min_rtt
        return rtt is not None and floor is not None and rtt > 1.5 * floor + QUEUE_SLACK

    def tick(self, inflight: int = 0) -> float | None:
        """Fold in the last interval's acknowledgements; returns the new pacing rate (bytes/s)."""
        now = self.clock()
        dt = now - self._last_tick
        if dt < SAMPLE * 0.5:
            return self._pacing
        self._inflight = inflight
        # Delivery rate over the last RATE_SPAN seconds: acknowledgements arrive in bursts, and a
        # single 100 ms interval overstates the path by 10-20%.
        counter = self._wire_acked if self._wire else self._acked
        self._ticks.append((now, counter))
        while len(self._ticks) > 2 and now - self._ticks[1][0] >= RATE_SPAN:
            self._ticks.popleft()
        t_old, acked_old = self._ticks[0]
        # Idle time before a burst began is not delivery time: nothing was in flight, so the
        # bytes acknowledged since t_old were all sent after it. Counting it would put a burst
        # shorter than RATE_SPAN (a 1 GiB transfer on a 30 Gbit/s path) at a fraction of the
        # path's rate, and a paced link would then hold every later burst to that fraction.
        start = max(t_old, min(self._busy_since, now - SAMPLE))
        self._delivery = max(0, counter - acked_old) / max(now - start, 1e-6)
        self._last_tick = now
        while self._rtts and now - self._rtts[0][0] > RTT_WINDOW:
            self._rtts.popleft()
        limited = self._app_limited or self._idle
        self._app_limited = False
        paced, self._paced = self._paced, False
        if self._delivery > 0 or inflight > 0:
            # An app-limited sample may raise the estimate, never lower it (as in BBR): streaming
            # layers while prefill computes must not talk the pacer down to the prefill's pace.
            if not limited:
                self._samples.append((now, self._delivery))
            elif self._bw is None or self._delivery > self._bw:
                self._samples.append((now, self._delivery))
        while self._samples and now - self._samples[0][0] > BW_WINDOW:
            self._samples.popleft()
        congested = self._queueing() or self._loss > 0.005 or self._nacks > 0
        self._nacks = 0
        if congested:
            self._last_congested = now
        if not self._samples:
            # Nothing but app-limited intervals lately: the estimate stands, and so does pacing,
            # unless the pacer itself is what held those bursts back on a clear path.
            self._lift_if_held_back(paced, now)
            return self._pacing
        self._bw = max(s for _, s in self._samples)
        recent = [s for _, s in list(self._samples)[-3:]]
        if congested and len(recent) == 3 and max(recent) < 0.8 * self._bw:
            # The path got slower: trust the last samples now rather than in BW_WINDOW seconds.
            self._bw = max(recent)
            self._samples = collections.deque(list(self._samples)[-3:])
        if self.adaptive and not limited:
            self._pacing = self._next_rate(congested, paced)
        else:
            # An interval the application limited says nothing about the path's rate, so the
            # pacing rate stays as it was (bursts that queue meanwhile are TCP's to handle);
            # but if the pacer held the sender back and the path has been clear, lift it.
            self._lift_if_held_back(paced, now)
        return self._pacing

    def _lift_if_held_back(self, paced: bool, now: float) -> None:
        if self.adaptive and paced and self._phase != "startup" and self._clear(now):
            self._pacing = self._lift(max(self._bw or 0.0, 1.0))

    def _clear(self, now: float) -> bool:
        return now - self._last_congested > CLEAR_AFTER

    def _lift(self, bw: float) -> float | None:
        self._phase, self._startup_best, self._startup_flat = "startup", bw, 0
        return self.cap if self._initial is None else min(STARTUP_GAIN * bw, self.cap or float("inf"))

    def _next_rate(self, congested: bool, paced: bool = False) -> float | None:
        now = self.clock()
        bw = max(self._bw or 0.0, 1.0)
        if self._phase == "startup":
            if not congested:
                if self._initial is None:
                    return self.cap  # unpaced (or capped): TCP's own slow start probes
                if bw > 1.25 * self._startup_best:
                    self._startup_best, self._startup_flat = bw, 0
                else:
                    self._startup_flat += 1
                if self._startup_flat < 3:
                    rate = max(self._initial, STARTUP_GAIN * bw)
                    return min(rate, self.cap) if self.cap else rate
            self._phase, self._cycle = "drain", 0
        elif self._clear(now) and self._pacing and (paced or self._delivery >= 0.9 * self._pacing):
            # Pacing binds but the path has shown no queue or loss for a while: the bottleneck is
            # elsewhere (or it moved up); let TCP find the new rate as in startup.
            return self._lift(bw)
        self._cycle = (self._cycle + 1) % len(CYCLE)
        gain = CYCLE[self._cycle]
        if congested and gain >= 1.0:
            gain = DRAIN_GAIN
        self._phase = {PROBE_GAIN: "probe", DRAIN_GAIN: "drain"}.get(gain, "cruise")
        rate = max(gain * bw, MIN_RATE)
        return min(rate, self.cap) if self.cap else rate

    def snapshot(self) -> LinkSnapshot:
        bits = (lambda v: None if v is None else v * 8)
        avail = self._bw if self._bw is None or not self.cap else min(self._bw, self.cap)
        util = self._delivery / self._bw if self._bw else 0.0
        ms = (lambda v: None if v is None else v * 1e3)
        return LinkSnapshot(self.clock(), bits(avail), bits(self._pacing), bits(self.cap), self._delivery * 8,
                            min(util, 1.0), ms(self.rtt), ms(self.min_rtt), self._loss, self._retrans_total,
                            self._inflight, self._phase)
