"""The kernel fast path: pools served by nftables that pointsman programs.

pointsman stays the control plane (health, drain, weights, reload) and is the only writer of the
data plane's maps, as Katran's control plane is of its BPF maps; the kernel forwards packets,
either with conntrack DNAT (each established flow pinned to its backend) or stateless (notrack,
every packet rewritten from the same slot map). One module per concern:

- `jhash`: the kernel's jhash and nft's `jhash ... mod N` in Python (pure);
- `plan`: which backend each slot of a listener's table sends new flows to, and what a listener
  config the kernel can serve looks like (pure);
- `ruleset`: the nftables text and JSON pointsman writes, as pure functions of a listener spec;
- `program`: from what the kernel holds and a pool snapshot to the transaction that updates it
  (pure), and committing it;
- `nft`: the libnftables binding, found in Debian's python3-nftables, and the one table we own
  (its transactions run in its own thread, in order, never on the event loop);
- `netlink`: named counters read straight from nf_tables over netlink (a counter list through
  libnftables also reads every map element: 30+ ms with a full slot map);
- `conntrack`: the conntrack table's use and bound, and cutting flows (conntrack -D, asyncio);
- `stats`: the listener's statistics snapshot, built from a reading taken in the background;
- `listener`: `KernelListener`, the runtime's listener for `dataplane: kernel`;
- `kernel.datapath: tc` (stateless NAT as a tc BPF program, `bpf/stateless.c`): `tcmaps` (the
  maps' keys and values as bytes, the shared layout; pure), `tcplan` (the ordered map writes of
  one update; pure), `tcbpf` (clang and libbpf: build, load, attach, map I/O), `tcpath` (the
  process's one program, shared by the tc listeners), `tclistener` (`TcListener`;
  `listener.kernel_listener` picks the listener for a config).

See docs/kernel.md for the table layout, routing with and without SNAT, limits and metrics.
"""
