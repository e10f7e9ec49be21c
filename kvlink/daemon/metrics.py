"""Prometheus exposition of pool summaries with ``prometheus_client`` (which escapes label values:
a tenant or model name cannot inject metric lines). One registry per scrape, holding only the
pools the caller may see."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _Pools:
    """A collector over ``{(model, tenant): summary}``."""

    def __init__(self, summaries: dict[tuple[str, str], dict]):
        self.summaries = summaries

    def collect(self):
        labels = ["model", "namespace", "tier"]
        size = GaugeMetricFamily("kvlink_pool_tier_bytes", "bytes of a pool tier", labels=labels + ["kind"])
        entries = GaugeMetricFamily("kvlink_pool_tier_entries", "entries in a pool tier", labels=labels)
        events = CounterMetricFamily("kvlink_pool_events", "pool events", labels=["model", "namespace", "event"])
        for (model, tenant), summary in sorted(self.summaries.items()):
            for tier, t in summary["tiers"].items():
                for kind in ("used", "capacity", "disk"):
                    if kind in t:
                        size.add_metric([model, tenant, tier, kind], t[kind])
                entries.add_metric([model, tenant, tier], t["entries"])
            for event, count in sorted(summary["counters"].items()):
                events.add_metric([model, tenant, event], count)
        yield from (size, entries, events)


def exposition(summaries: dict[tuple[str, str], dict]) -> bytes:
    """Prometheus text format of these pools' summaries."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Pools(summaries))
    return generate_latest(registry)
