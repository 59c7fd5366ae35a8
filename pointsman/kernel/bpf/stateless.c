// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * pointsman's stateless NAT as a tc (clsact ingress) BPF program: what the `nat: stateless`
 * nftables table does, with each lookup a BPF map lookup instead of an nft interpreter run.
 *
 * Attached at ingress of the interfaces that carry the listeners' traffic (the clients' side and
 * the backends' side). For an IPv4 TCP or UDP packet:
 *
 *   to a VIP (map `vips`: address . port . protocol -> listener):
 *       slot = reciprocal_scale(jhash(saddr . sport, seed), slots)   -- nft's `jhash ip saddr .
 *       th sport mod <slots> seed <seed>`, so a client lands on the same slot as with nftables;
 *       `slot_map[base + slot]` -> backend address and port; rewrite the destination (L3 and L4
 *       checksums), count, and forward (FIB lookup, then straight to the egress interface);
 *       an empty slot (or a listener stopping, for what would open a flow): count as rejected
 *       and drop.
 *   from a backend (map `replies`: address . port . protocol -> VIP and port), unless addressed
 *   to this host (health checks keep their addresses): rewrite the source to the VIP, count,
 *   forward the same way.
 *   anything else, or what the FIB cannot forward (local, no route, TTL out): to the stack.
 *
 * Packets forwarded here skip netfilter (no conntrack entry, no nft rule) and the IP forward
 * path; the TTL is decremented as a router would. Counters are per CPU, summed by userspace.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

#define MAX_LISTENERS 256
#define MAX_BACKENDS 4096
#define MAX_SLOTS (1 << 18)

#define FLAG_HASH_PORT 1 /* hash saddr . sport (hash_key source_ip_port); else saddr alone */
#define FLAG_DRAINING 2  /* the listener stops: refuse what opens a flow (TCP SYN; any UDP) */

struct vip_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct vip_value {
	__u32 base;      /* first index of the listener's slots in slot_map */
	__u32 slots;     /* how many */
	__u32 seed;      /* jhash seed */
	__u16 flags;     /* FLAG_HASH_PORT, FLAG_DRAINING */
	__u16 listener;  /* index into listener_stats */
};

struct slot_value {
	__be32 addr;     /* 0: empty slot */
	__be16 port;
	__u16 backend;   /* index into backend_stats */
};

struct reply_value {
	__be32 vip;
	__be16 vport;
	__u16 backend;
};

struct backend_stats {
	__u64 packets_in;
	__u64 bytes_in;
	__u64 packets_out;
	__u64 bytes_out;
	__u64 new_flows;
};

struct listener_stats {
	__u64 rejected;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LISTENERS);
	__type(key, struct vip_key);
	__type(value, struct vip_value);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct slot_value);
} slot_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, struct vip_key);
	__type(value, struct reply_value);
} replies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend_stats);
} backend_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_LISTENERS);
	__type(key, __u32);
	__type(value, struct listener_stats);
} listener_stats SEC(".maps");

static __always_inline __u32 rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> (32 - shift));
}

/* lookup3's final() as Linux jhash.h has it (__jhash_final). */
static __always_inline __u32 jhash_final(__u32 a, __u32 b, __u32 c)
{
	c ^= b; c -= rol32(b, 14);
	a ^= c; a -= rol32(c, 11);
	b ^= a; b -= rol32(a, 25);
	c ^= b; c -= rol32(b, 16);
	a ^= c; a -= rol32(c, 4);
	b ^= a; b -= rol32(a, 14);
	c ^= b; c -= rol32(b, 24);
	return c;
}

/*
 * jhash() of nft's registers for `ip saddr . th sport` (8 bytes: the address, the port in network
 * order and two zero bytes) or `ip saddr` (4 bytes), read as little-endian words as the kernel
 * does on x86 and arm64: the raw loads below are those words on a little-endian machine.
 */
static __always_inline __u32 source_hash(__be32 saddr, __be16 sport, __u32 seed, int with_port)
{
	__u32 length = with_port ? 8 : 4;
	__u32 a = 0xdeadbeef + length + seed;
	__u32 b = a, c = a;

	a += (__u32)saddr;
	if (with_port)
		b += (__u32)sport;
	return jhash_final(a, b, c);
}

/* Linux reciprocal_scale(): [0, 2^32) onto [0, n) with a multiply and a shift, as nft_jhash does. */
static __always_inline __u32 reciprocal_scale(__u32 value, __u32 n)
{
	return (__u32)(((__u64)value * n) >> 32);
}

/* The route of a packet from `saddr` to `daddr` come in on the skb's interface (bpf_fib_lookup). */
static __always_inline int route(struct __sk_buff *skb, struct bpf_fib_lookup *fib, struct iphdr *ip,
				 __be32 saddr, __be32 daddr)
{
	fib->family = AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	/* tot_len stays 0: the helper then checks the MTU against the skb (is_skb_forwardable),
	 * which knows a GSO packet leaves in segments; a tot_len would refuse every one of them. */
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = skb->ingress_ifindex;
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/*
 * Send a rewritten packet where `route` said: TTL down by one, MACs set, out of the egress
 * interface (bpf_redirect_neigh when the neighbour is not resolved yet). TC_ACT_OK (the stack's
 * normal path) for what the lookup could not forward: local destinations, no route, TTL out.
 */
static __always_inline int forward(struct __sk_buff *skb, __u32 l3, struct bpf_fib_lookup *fib, int rc)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + l3;
	__u16 old_word, new_word;
	__u8 ttl;

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	if ((void *)(ip + 1) > end || ip->ttl <= 1)
		return TC_ACT_OK;
	/* TTL is the high byte of the 16-bit word it shares with the protocol. */
	ttl = ip->ttl - 1;
	old_word = bpf_htons(((__u16)ip->ttl << 8) | ip->protocol);
	new_word = bpf_htons(((__u16)ttl << 8) | ip->protocol);
	bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), old_word, new_word, sizeof(__u16));
	bpf_skb_store_bytes(skb, l3 + offsetof(struct iphdr, ttl), &ttl, 1, 0);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib->ipv4_dst };

		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), fib->dmac, ETH_ALEN, 0);
	bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), fib->smac, ETH_ALEN, 0);
	return bpf_redirect(fib->ifindex, 0);
}

/* Replace an address (L3 checksum, and the L4 one through the pseudo header) and maybe a port. */
static __always_inline void rewrite(struct __sk_buff *skb, __u32 l3, __u32 l4, __u8 proto,
				    __u32 addr_at, __be32 old_addr, __be32 new_addr,
				    __u32 port_at, __be16 old_port, __be16 new_port)
{
	__u32 check_at = l4 + (proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
						    : offsetof(struct udphdr, check));
	__u64 flags = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	bpf_l4_csum_replace(skb, check_at, old_addr, new_addr, flags | BPF_F_PSEUDO_HDR | sizeof(new_addr));
	bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), old_addr, new_addr, sizeof(new_addr));
	bpf_skb_store_bytes(skb, l3 + addr_at, &new_addr, sizeof(new_addr), 0);
	if (old_port != new_port) {
		bpf_l4_csum_replace(skb, check_at, old_port, new_port, flags | sizeof(new_port));
		bpf_skb_store_bytes(skb, l4 + port_at, &new_port, sizeof(new_port), 0);
	}
}

SEC("tc")
int pointsman_stateless(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u32 l3 = sizeof(struct ethhdr), l4;
	__be16 *ports;
	struct vip_key key = {};
	__u8 proto;
	int syn = 0;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = data + l3;
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return TC_ACT_OK;
	proto = ip->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(0x3fff))  /* a fragment: no ports to match (the stack's) */
		return TC_ACT_OK;
	l4 = l3 + ip->ihl * 4;
	ports = data + l4;
	if ((void *)(ports + 2) > end)
		return TC_ACT_OK;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + l4;

		if ((void *)(tcp + 1) > end)
			return TC_ACT_OK;
		syn = tcp->syn && !tcp->ack;
	}
	key.addr = ip->daddr;
	key.port = ports[1];
	key.proto = proto;
	struct vip_value *vip = bpf_map_lookup_elem(&vips, &key);
	if (vip) {
		__be32 saddr = ip->saddr, daddr = ip->daddr;
		__be16 sport = ports[0], dport = ports[1];
		__u32 n = vip->slots, index;
		struct slot_value *slot;
		struct backend_stats *stats;

		index = vip->base + reciprocal_scale(source_hash(saddr, sport, vip->seed,
								  vip->flags & FLAG_HASH_PORT), n);
		slot = n ? bpf_map_lookup_elem(&slot_map, &index) : NULL;
		if (!slot || !slot->addr ||
		    ((vip->flags & FLAG_DRAINING) && (syn || proto == IPPROTO_UDP))) {
			__u32 at = vip->listener;
			struct listener_stats *ls = bpf_map_lookup_elem(&listener_stats, &at);

			if (ls)
				ls->rejected++;
			return TC_ACT_SHOT;
		}
		__u32 backend = slot->backend;
		__be32 to = slot->addr;
		__be16 to_port = slot->port;

		stats = bpf_map_lookup_elem(&backend_stats, &backend);
		if (stats) {
			stats->packets_in++;
			stats->bytes_in += skb->len;
			stats->new_flows += syn;
		}
		struct bpf_fib_lookup fib = {};
		int rc = route(skb, &fib, ip, saddr, to);

		rewrite(skb, l3, l4, proto, offsetof(struct iphdr, daddr), daddr, to,
			2, dport, to_port);
		return forward(skb, l3, &fib, rc);
	}
	key.addr = ip->saddr;
	key.port = ports[0];
	struct reply_value *reply = bpf_map_lookup_elem(&replies, &key);
	if (reply) {
		__be32 saddr = ip->saddr;
		__be16 sport = ports[0];
		struct bpf_fib_lookup fib = {};
		int rc;
		struct backend_stats *stats;
		__u32 backend = reply->backend;
		__be32 vip_addr = reply->vip;
		__be16 vport = reply->vport;

		/* A reply to this host (a health check) keeps the backend's address. */
		rc = route(skb, &fib, ip, reply->vip, ip->daddr);
		if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
			return TC_ACT_OK;
		stats = bpf_map_lookup_elem(&backend_stats, &backend);
		if (stats) {
			stats->packets_out++;
			stats->bytes_out += skb->len;
		}
		rewrite(skb, l3, l4, proto, offsetof(struct iphdr, saddr), saddr, vip_addr,
			0, sport, vport);
		return forward(skb, l3, &fib, rc);
	}
	return TC_ACT_OK;
}

/* The kernel lets only GPL-compatible programs call bpf_fib_lookup(): this file is offered
 * under GPL-2.0 as well as the project's Apache-2.0 (the SPDX line above). */
char LICENSE[] SEC("license") = "GPL";
