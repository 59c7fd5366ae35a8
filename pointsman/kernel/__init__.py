"""The kernel fast path: pools served by nftables DNAT that pointsman programs.

pointsman stays the control plane (health, drain, weights, reload) and is the only writer of the
data plane's maps, as Katran's control plane is of its BPF maps; the kernel forwards packets and
conntrack keeps each established flow on its backend. One module per concern:

- `jhash`: the kernel's jhash and nft's `jhash ... mod N` in Python (pure);
- `plan`: which backend each slot of a listener's table sends new flows to, and what a listener
  config the kernel can serve looks like (pure);
- `ruleset`: the nftables text and JSON pointsman writes, as pure functions of a listener spec;
- `nft`: the libnftables binding, found in Debian's python3-nftables, and the one table we own;
- `netlink`: named counters read straight from nf_tables over netlink (a counter list through
  libnftables also reads every map element: 30+ ms with a full slot map);
- `conntrack`: the conntrack table's use and bound, and cutting flows (conntrack -D);
- `listener`: `KernelListener`, the runtime's listener for `dataplane: kernel`.

See docs/kernel.md for the table layout, routing with and without SNAT, limits and metrics.
"""
