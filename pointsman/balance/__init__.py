"""Balancing: pure pickers over one immutable pool snapshot; no I/O, time is an argument.

One algorithm per module, each citing its source; `build_picker` maps a configured name to one.
"""

from pointsman.balance.affinity import AffinityTable
from pointsman.balance.base import Candidate, Loaded, Picker
from pointsman.balance.factory import ALGORITHMS, build_picker
from pointsman.balance.hashing import HASH_KEYS, source_key, stable_hash64
from pointsman.balance.least_connections import LeastConnections
from pointsman.balance.maglev import Maglev, build_table, is_prime
from pointsman.balance.power_of_two import PowerOfTwo
from pointsman.balance.round_robin import RoundRobin
from pointsman.balance.slow_start import effective_weight, ramp_done
from pointsman.balance.source_hash import SourceHash
from pointsman.balance.weighted_round_robin import WeightedRoundRobin

__all__ = [
    "ALGORITHMS",
    "HASH_KEYS",
    "AffinityTable",
    "Candidate",
    "LeastConnections",
    "Loaded",
    "Maglev",
    "Picker",
    "PowerOfTwo",
    "RoundRobin",
    "SourceHash",
    "WeightedRoundRobin",
    "build_picker",
    "build_table",
    "effective_weight",
    "is_prime",
    "ramp_done",
    "source_key",
    "stable_hash64",
]
