"""VIP announcement by BGP, gated by health, against a real router (bird2) in network namespaces.

One lab per module (see bgp_support.py): a bird2 router with `merge paths` into its kernel table,
two pointsman nodes announcing 10.99.0.10/32 through ExaBGP (node 1 a single process, node 2 a
control process with two workers), a client behind the router. Before each
test the `fleet` fixture brings both nodes back to "running, backend up, not drained, announcing",
so every test starts from two ECMP next hops whatever the previous one did.

Latencies are measured from the moment pointsman logged its decision (its log carries wall time
to the millisecond) to the moment the router's table showed the change (polled every 10 ms), and
printed (run with -s to see them). The assertions allow 1 s.

The nodes' /metrics (fetched inside their namespaces) must agree with what the router sees:
session up and flaps, each VIP announced or not and why, ExaBGP restarts.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.netns.bgp_support import ADMIN, CLIENTS, STICKY_PORT, Lab, Node, lab, sh, wait_until

pytestmark = pytest.mark.timeout(90)

REACT = 1.0  # the router must see a change within this long after pointsman decided it
START = 10.0  # pointsman start (imports, bind, ExaBGP start, BGP OPEN) until the route is in


@pytest.fixture(scope="module")
def bgp_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with lab(tmp_path_factory.mktemp("bgp")) as the_lab:
        yield the_lab


@pytest.fixture
def fleet(bgp_lab: Lab) -> Lab:
    """Both nodes running with their backend up and not drained; the router sees both."""
    for node in bgp_lab.nodes:
        if node.backend is None or node.backend.poll() is not None:
            bgp_lab.start_backend(node)
        if not node.sticky:
            bgp_lab.start_sticky_backends(node)
        if node.pointsman is None or node.pointsman.poll() is not None:
            bgp_lab.start_pointsman(node)
        elif "drained: yes" in bgp_lab.pointsman_cli(node, "node", "status"):
            bgp_lab.pointsman_cli(node, "node", "resume")
    bgp_lab.wait_next_hops(_all(bgp_lab), START)
    return bgp_lab


def _all(the_lab: Lab) -> set[str]:
    return {node.address for node in the_lab.nodes}


ROUTER = {"1": "10.0.11.254", "2": "10.0.12.254"}
VIP_LABELS = 'vip="10.99.0.10/32"'


def metrics(node: Node) -> dict[str, float]:
    """The node's /metrics as `name{labels}` -> value (labels sorted), fetched in its namespace."""
    text = sh("ip", "netns", "exec", node.ns, "python3", "-c",
              f"import urllib.request; print(urllib.request.urlopen('http://{ADMIN}/metrics', "
              "timeout=5).read().decode())")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def wait_metrics(node: Node, want: dict[str, float], timeout: float = 5.0) -> dict[str, float]:
    """Poll the node's /metrics until every sample in `want` has its value."""
    seen: dict[str, float] = {}

    def matches() -> bool:
        seen.clear()
        seen.update(metrics(node))
        return all(seen.get(k) == v for k, v in want.items())

    try:
        wait_until(f"{node.name} metrics {want}", matches, timeout, 0.1)
    except AssertionError:
        raise AssertionError(f"{node.name}: want {want}, have "
                             f"{ {k: seen.get(k) for k in want} }") from None
    return seen


def session(node: Node) -> str:
    return f'peer="{ROUTER[str(node.index)]}"'


def _report(what: str, seconds: float) -> None:
    print(f"\nbgp timing: {what}: {seconds * 1000:.0f} ms")


def test_router_learns_the_vip_from_both_nodes_as_ecmp(bgp_lab: Lab) -> None:
    for node in bgp_lab.nodes:
        bgp_lab.stop_process(node.pointsman)
        if node.backend is None or node.backend.poll() is not None:
            bgp_lab.start_backend(node)
        if not node.sticky:
            bgp_lab.start_sticky_backends(node)
    started = [bgp_lab.start_pointsman(node) for node in bgp_lab.nodes]
    seen = bgp_lab.wait_next_hops(_all(bgp_lab), START)
    _report("pointsman start -> route at the router (both nodes)", seen - max(started))
    # merge paths: the router's forwarding table holds one route with both next hops
    wait_until("two ECMP next hops in the router's kernel",
               lambda: bgp_lab.kernel_next_hops() == _all(bgp_lab), REACT)


def test_one_exabgp_per_node_whatever_the_worker_count(fleet: Lab) -> None:
    node1, node2 = fleet.nodes
    assert (node1.workers, node2.workers) == (1, 2)
    for node in fleet.nodes:
        commands = fleet.ns_commands(node.ns)
        assert sum(" -m exabgp " in cmd for cmd in commands) == 1, commands
        assert sum("relay.py" in cmd for cmd in commands) == 1, commands


def test_client_traffic_reaches_the_vip_through_both_nodes(fleet: Lab) -> None:
    names = fleet.client_names(32)
    assert len(names) == 32
    # L4 ECMP hashing spreads 32 source ports over both next hops (all on one: p = 2**-31)
    assert set(names) == {"node1", "node2"}, names


def test_maglev_sends_a_client_to_the_same_backend_through_either_node(fleet: Lab) -> None:
    """Every node builds the same Maglev table (fixed hash, same config), so a client's backend
    does not depend on the node the router picked: the ECMP + Maglev pairing in docs/bgp.md."""
    per_client = {}
    for source in CLIENTS:
        answers = fleet.client_names(16, port=STICKY_PORT, source=source)
        nodes = {answer.split("-")[0] for answer in answers}
        backends = {answer.split("-")[1] for answer in answers}
        # each client reached both nodes (16 ports, L4 hash: one node only has p = 2**-15)...
        assert nodes == {"node1", "node2"}, (source, answers)
        # ...and one backend, whichever node it went through
        assert len(backends) == 1, (source, answers)
        per_client[source] = backends.pop()
    print(f"\nmaglev: client -> backend {per_client}")


def test_backend_down_withdraws_and_backend_up_announces(fleet: Lab) -> None:
    node1, node2 = fleet.nodes
    assert node1.backend is not None
    killed = time.time()
    node1.backend.send_signal(signal.SIGKILL)
    seen = fleet.wait_next_hops({node2.address}, REACT + 0.5)
    decided = node1.log_time(r"bgp: withdraw 10\.99\.0\.10/32: pool web has 0", after=killed)
    assert seen - decided < REACT
    _report("backend killed -> withdrawn at the router (incl. 0.1 s health check)", seen - killed)
    _report("withdraw decision -> withdrawn at the router", seen - decided)
    assert set(fleet.client_names(8)) == {"node2"}  # node1 gets nothing while withdrawn
    wait_metrics(node1, {
        f'pointsman_bgp_vip_announced{{listener="",pool="web",{VIP_LABELS}}}': 0,
        f'pointsman_bgp_vip_reason{{reason="too_few_backends",{VIP_LABELS}}}': 1,
        f'pointsman_bgp_vip_available_backends{{{VIP_LABELS}}}': 0,
        f"pointsman_bgp_session_up{{{session(node1)}}}": 1,  # the session stays up
    })

    restarted = time.time()
    fleet.start_backend(node1)
    seen = fleet.wait_next_hops(_all(fleet), REACT + 0.5)
    decided = node1.log_time(r"bgp: announce 10\.99\.0\.10/32", after=restarted)
    assert seen - decided < REACT
    _report("announce decision -> announced at the router", seen - decided)
    wait_metrics(node1, {
        f'pointsman_bgp_vip_announced{{listener="",pool="web",{VIP_LABELS}}}': 1,
        f'pointsman_bgp_vip_reason{{reason="serving",{VIP_LABELS}}}': 1,
        f'pointsman_bgp_vip_available_backends{{{VIP_LABELS}}}': 1,
    })


def test_node_drain_withdraws_and_resume_announces(fleet: Lab) -> None:
    node1, node2 = fleet.nodes
    before = time.time()
    out = fleet.pointsman_cli(node2, "node", "drain")
    assert "10.99.0.10/32: withdrawn (node_drained)" in out
    seen = fleet.wait_next_hops({node1.address}, REACT)
    decided = node2.log_time(r"bgp: withdraw 10\.99\.0\.10/32: the node is drained", after=before)
    _report("node drain -> withdrawn at the router", seen - decided)
    # the drained node still serves (its listener and pool are untouched); the router avoids it
    assert set(fleet.client_names(8)) == {"node1"}
    assert fleet.readyz(node2) == 503  # not ready while drained: a front end stops too
    assert fleet.readyz(node1) == 200
    wait_metrics(node2, {  # node 2 is a control process with workers: its announcer reports
        f'pointsman_bgp_vip_announced{{listener="",pool="web",{VIP_LABELS}}}': 0,
        f'pointsman_bgp_vip_reason{{reason="node_drained",{VIP_LABELS}}}': 1,
        f'pointsman_bgp_vip_reason{{reason="serving",{VIP_LABELS}}}': 0,
    })

    before = time.time()
    out = fleet.pointsman_cli(node2, "node", "resume")
    assert "10.99.0.10/32: announced" in out
    seen = fleet.wait_next_hops(_all(fleet), REACT)
    decided = node2.log_time(r"bgp: announce 10\.99\.0\.10/32", after=before)
    _report("node resume -> announced at the router", seen - decided)
    wait_metrics(node2, {
        f'pointsman_bgp_vip_announced{{listener="",pool="web",{VIP_LABELS}}}': 1,
        f'pointsman_bgp_vip_reason{{reason="serving",{VIP_LABELS}}}': 1,
    })


def test_a_session_reset_by_the_router_gets_the_route_back(fleet: Lab) -> None:
    """ExaBGP keeps what pointsman asked for (adj-rib-out) and sends it on the new session."""
    node1, node2 = fleet.nodes
    up, flaps = f"pointsman_bgp_session_up{{{session(node1)}}}", \
        f"pointsman_bgp_session_flaps_total{{{session(node1)}}}"
    before = wait_metrics(node1, {up: 1})[flaps]
    assert "disabled" in fleet.birdc("disable node1")
    fleet.wait_next_hops({node2.address}, REACT)
    wait_metrics(node1, {up: 0, flaps: before + 1})
    enabled = time.time()
    assert "enabled" in fleet.birdc("enable node1")
    seen = fleet.wait_next_hops(_all(fleet), 10.0)
    _report("router re-enables the session -> route back", seen - enabled)
    assert "peer 10.0.11.254: up" in fleet.pointsman_cli(node1, "node", "status")
    wait_metrics(node1, {up: 1, flaps: before + 1})


def test_a_killed_exabgp_is_replaced_and_the_route_comes_back(fleet: Lab) -> None:
    node1, node2 = fleet.nodes
    status = fleet.pointsman_cli(node1, "node", "status")
    match = re.search(r"exabgp: running \(pid (\d+), (\d+) restarts\)", status)
    assert match, status
    flaps = f"pointsman_bgp_session_flaps_total{{{session(node1)}}}"
    before = wait_metrics(node1, {"pointsman_bgp_speaker_running{}": 1,
                                  "pointsman_bgp_exabgp_restarts_total{}": int(match.group(2))})
    killed = time.time()
    os.kill(int(match.group(1)), signal.SIGKILL)
    fleet.wait_next_hops({node2.address}, REACT)  # its session closed with it
    seen = fleet.wait_next_hops(_all(fleet), 10.0)  # restarted after 1 s, told the VIP again
    _report("ExaBGP SIGKILLed -> route back via a new ExaBGP (1 s backoff)", seen - killed)
    status = fleet.pointsman_cli(node1, "node", "status")
    assert f"{int(match.group(2)) + 1} restarts" in status, status
    wait_metrics(node1, {  # the session died with ExaBGP (a flap) and came back with the new one
        "pointsman_bgp_exabgp_restarts_total{}": int(match.group(2)) + 1,
        "pointsman_bgp_speaker_running{}": 1,
        f"pointsman_bgp_session_up{{{session(node1)}}}": 1,
        flaps: before[flaps] + 1,
    })


def test_shutdown_withdraws_first_and_leaves_no_process(fleet: Lab) -> None:
    node1, node2 = fleet.nodes
    assert node2.pointsman is not None
    stopping = time.time()
    node2.pointsman.send_signal(signal.SIGTERM)
    seen = fleet.wait_next_hops({node1.address}, REACT)
    _report("SIGTERM -> withdrawn at the router", seen - stopping)
    assert fleet.stop_process(node2.pointsman) == 0  # waits for the exit, then reads its code
    log = node2.log_text()
    assert log.index("withdraw 10.99.0.10/32: the node is stopping") < log.index("ExaBGP stopped")
    _assert_only_backend_left(fleet, node2)


def test_killed_pointsman_takes_its_route_and_exabgp_with_it(fleet: Lab) -> None:
    """SIGKILL gives pointsman no chance to withdraw: the relay sees its socket close and stops
    ExaBGP, whose session close makes the router drop the route."""
    node1, node2 = fleet.nodes
    assert node1.pointsman is not None
    killed = time.time()
    node1.pointsman.send_signal(signal.SIGKILL)
    seen = fleet.wait_next_hops({node2.address}, REACT)
    fleet.stop_process(node1.pointsman)  # reap it
    _report("SIGKILL of pointsman -> withdrawn at the router", seen - killed)
    wait_until("ExaBGP and the relay to exit", lambda: _only_backend(fleet, node1), 5.0)
    wait_until("the relay to remove ExaBGP's directory", lambda: not any(node1.tmp.iterdir()), 5.0)
    assert set(fleet.client_names(8)) == {"node2"}


def _only_backend(the_lab: Lab, node: Node) -> bool:
    """Only the backends the lab started remain in the node: no ExaBGP, no relay."""
    assert node.backend is not None
    backends = {node.backend.pid, *(p.pid for p in node.sticky)}
    return set(the_lab.ns_pids(node.ns)) == backends


def _assert_only_backend_left(the_lab: Lab, node: Node) -> None:
    wait_until(f"only the backends left in {node.name}", lambda: _only_backend(the_lab, node), 5.0)
    assert not any(node.tmp.iterdir()), list(node.tmp.iterdir())
