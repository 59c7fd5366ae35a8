"""DNS discovery: SRV records (targets and ports) or A/AAAA records (on a configured port),
re-resolved when the answer's TTL runs out, never faster than `min_ttl`.

SRV (RFC 2782): only the lowest priority is used (clients must try it first; the higher ones are
fallbacks that health checks cannot reach from here), and the record's weight becomes the
backend's weight, capped at the config's 1000 (weight 0 means "rarely", so it becomes 1).
Each target is resolved to A and AAAA records; the answer's TTL is the smallest in the chain.

A failed or empty answer keeps the last set (the composer does not empty a pool) and is retried
with backoff starting at `min_ttl`; the log says so once per failure streak, not per try.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
import dns.rrset

from pointsman.config.model import BackendConfig, DnsDiscoveryConfig
from pointsman.discovery.rules import dns_problem
from pointsman.discovery.source import Publish, backend, canonical
from pointsman.fleet.backoff import Backoff

log = logging.getLogger("pointsman.discovery")

QUERY_TIMEOUT = 2.0  # one query, all retries included; a resolver slower than this is failing
MAX_TTL = 300.0  # re-resolve at least every 5 minutes, whatever the TTL says
ERROR_RETRY_CAP = 30.0
MAX_WEIGHT = 1000  # the config's weight limit (model.BackendConfig.weight)


class DnsProblem(Exception):
    """The name did not resolve to any backend (NXDOMAIN, no records, timeout, server failure)."""


@dataclass(frozen=True, slots=True)
class Answer:
    backends: tuple[BackendConfig, ...]
    ttl: float


class DnsSource:
    kind = "dns"

    def __init__(self, config: DnsDiscoveryConfig) -> None:
        problem = dns_problem(config)
        if problem is not None:
            raise ValueError(problem)
        self.config = config
        self.resolver = dns.asyncresolver.Resolver(configure=config.resolver is None)
        if config.resolver is not None:
            self.resolver.nameservers = [config.resolver.host]
            self.resolver.port = config.resolver.port
        self.resolver.lifetime = QUERY_TIMEOUT
        self.resolver.cache = None  # this loop is the cache: it honours the TTL itself
        where = f" via {config.resolver}" if config.resolver is not None else ""
        self.describe = (f"SRV {config.srv}{where}" if config.srv is not None
                         else f"A/AAAA {config.name} port {config.port}{where}")

    async def run(self, publish: Publish) -> None:
        backoff = Backoff(first=max(self.config.min_ttl, 0.1), cap=ERROR_RETRY_CAP)
        failing = False
        while True:
            try:
                answer = await self.resolve()
            except DnsProblem as exc:
                if not failing:
                    log.warning("dns %s: %s; keeping the backends found before, retrying",
                                self.describe, exc)
                failing = True
                publish(())
                await asyncio.sleep(backoff.next())
                continue
            if failing:
                log.info("dns %s: answering again", self.describe)
            failing = False
            backoff.reset()
            publish(answer.backends)
            await asyncio.sleep(min(max(answer.ttl, self.config.min_ttl), MAX_TTL))

    async def resolve(self) -> Answer:
        if self.config.srv is not None:
            return await self._srv(self.config.srv)
        assert self.config.name is not None and self.config.port is not None
        addresses, ttl = await self._addresses(self.config.name)
        return Answer(canonical([backend(a, self.config.port) for a in addresses]), ttl)

    async def _srv(self, name: str) -> Answer:
        rrset = await self._query(name, dns.rdatatype.SRV)
        if rrset is None or not len(rrset):
            raise DnsProblem(f"no SRV records for {name}")
        records = [(r.priority, r.weight, r.port, r.target.to_text()) for r in rrset]
        lowest = min(r[0] for r in records)
        targets = sorted({r[3] for r in records if r[0] == lowest})
        found = await asyncio.gather(*(self._addresses(t) for t in targets), return_exceptions=True)
        addresses: dict[str, list[str]] = {}
        ttl = float(rrset.ttl)
        for target, result in zip(targets, found, strict=True):
            if isinstance(result, DnsProblem):
                log.warning("dns %s: target %s: %s", self.describe, target, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                addresses[target], ttl = result[0], min(ttl, result[1])
        backends = srv_backends(records, addresses)
        if not backends:
            raise DnsProblem(f"no SRV target of {name} resolved to an address")
        return Answer(backends, ttl)

    async def _addresses(self, name: str) -> tuple[list[str], float]:
        """A and AAAA records of `name`; one failing type is fine while the other answers."""
        results = await asyncio.gather(self._query(name, dns.rdatatype.A),
                                       self._query(name, dns.rdatatype.AAAA),
                                       return_exceptions=True)
        sets: list[dns.rrset.RRset] = []
        problems: list[DnsProblem] = []
        for result in results:
            if isinstance(result, DnsProblem):
                problems.append(result)
            elif isinstance(result, BaseException):
                raise result
            elif result is not None and len(result):
                sets.append(result)
        if not sets:
            raise problems[0] if problems else DnsProblem(f"no A or AAAA records for {name}")
        return [r.address for rrset in sets for r in rrset], float(min(s.ttl for s in sets))

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        try:
            answer = await self.resolver.resolve(name, rdtype, raise_on_no_answer=False,
                                                 search=False)
        except dns.resolver.NXDOMAIN:
            raise DnsProblem(f"{name} does not exist (NXDOMAIN)") from None
        except dns.exception.DNSException as exc:
            raise DnsProblem(f"{name} {dns.rdatatype.to_text(rdtype)}: {exc}") from None
        return answer.rrset


def srv_backends(records: Sequence[tuple[int, int, int, str]],
                 addresses: dict[str, list[str]]) -> tuple[BackendConfig, ...]:
    """Backends from SRV (priority, weight, port, target) records and the targets' addresses."""
    if not records:
        return ()
    lowest = min(r[0] for r in records)
    return canonical([
        backend(address, port, min(max(weight, 1), MAX_WEIGHT))
        for priority, weight, port, target in records if priority == lowest
        for address in addresses.get(target, [])
    ])
