"""Routing and scheduling for PrfaaS-style deployments: the length-threshold router, the
bandwidth-aware scheduler, the throughput model and a discrete-event simulator."""

from kvlink.route.model import Deployment, Throughput, best_split, evaluate, solve_threshold
from kvlink.route.profiles import Empirical, KvSizeProfile, LengthDist, PrefillProfile
from kvlink.route.router import CacheTransfer, Decision, Router
from kvlink.route.scheduler import Scheduler, SchedulerConfig
from kvlink.route.simulator import SimResult, simulate

__all__ = ["CacheTransfer", "Decision", "Deployment", "Empirical", "KvSizeProfile", "LengthDist", "PrefillProfile",
           "Router", "Scheduler", "SchedulerConfig", "SimResult", "Throughput", "best_split", "evaluate",
           "simulate", "solve_threshold"]
