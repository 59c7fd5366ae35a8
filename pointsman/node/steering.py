"""Same client, same worker: a classic BPF program that picks the worker's socket by source address.

Workers bind every listener with SO_REUSEPORT, and by default the kernel spreads new connections
by a hash of the whole 4-tuple, so one client's connections land on every worker. That breaks what
is kept per client in one process: the affinity table, per-source connection caps and rates. For a
listener that keeps such state, each worker attaches this program to its socket (the program is
the reuseport group's, so attaching it again is harmless): the kernel then runs it for each new
connection (TCP SYN) or datagram (UDP) and uses its result as the index of the socket in the
group. The result hashes the source address, masked to the prefix the per-source limits use (so a
whole /64 shares a worker when limits count by /64), so every address (or prefix) has one worker.

Trade-off: a single very busy source (or prefix) is served by one worker. An index at or past the
group's size (a worker is restarting) makes the kernel fall back to its own hash until the group is
whole again; a worker's socket closing moves the last socket into its slot, so some sources move
worker then (and start a fresh affinity entry there).

Program (`bpf_program`) and attachment (`attach`) are separate so the program can be checked by a
small interpreter in the unit tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct

from pointsman.config.model import Config, ListenerConfig

SO_ATTACH_REUSEPORT_CBPF = 51  # include/uapi/asm-generic/socket.h; no constant in Python 3.11
SO_DETACH_REUSEPORT_BPF = 68

# Classic BPF opcodes (include/uapi/linux/filter.h, bpf_common.h).
BPF_LD, BPF_ALU, BPF_RET, BPF_MISC = 0x00, 0x04, 0x06, 0x07  # instruction classes
BPF_W, BPF_ABS = 0x00, 0x20  # load a 32-bit word at an absolute offset
BPF_AND, BPF_XOR, BPF_MUL, BPF_RSH, BPF_MOD = 0x50, 0xA0, 0x20, 0x70, 0x90  # ALU operations
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10  # operand: constant, X register; return A
BPF_TAX = 0x00  # with BPF_MISC: X = A
SKF_NET_OFF = -0x100000  # loads relative to the network (IP) header

GOLDEN = 0x9E3779B1  # Knuth's multiplicative hash constant (2^32 / phi)

Instruction = tuple[int, int, int, int]  # (code, jt, jf, k)


def needs_steering(listener: ListenerConfig, config: Config) -> bool:
    """True when the listener keeps per-client state that must live in one worker."""
    limits = listener.limits
    if limits.max_connections_per_source is not None or \
            limits.new_connections_per_second_per_source is not None:
        return True
    for name in listener.pool_names:
        pool = next((p for p in config.pools if p.name == name), None)
        if pool is None:
            continue
        if pool.affinity is not None or pool.algorithm == "source_hash" or (
                pool.algorithm == "maglev" and pool.hash_key == "source_ip"):
            return True
    return False


def source_prefix(listener: ListenerConfig, family: socket.AddressFamily) -> int:
    """The prefix length hashed: the per-source limits' prefix when they are on, else the whole
    address (affinity and hashing key on the full address, a finer key than any prefix)."""
    limits = listener.limits
    per_source = limits.max_connections_per_source is not None or \
        limits.new_connections_per_second_per_source is not None
    if family == socket.AF_INET6:
        return limits.source_prefix_v6 if per_source else 128
    return limits.source_prefix_v4 if per_source else 32


def _masks(prefix: int, words: int) -> list[int]:
    out = []
    for i in range(words):
        bits = min(max(prefix - 32 * i, 0), 32)
        out.append((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF if bits else 0)
    return out


def bpf_program(family: socket.AddressFamily, prefix: int, groups: int) -> list[Instruction]:
    """A program returning hash(source address / prefix) % groups."""
    if groups < 1:
        raise ValueError("groups must be at least 1")
    offset, words = (8, 4) if family == socket.AF_INET6 else (12, 1)
    program: list[Instruction] = []
    first = True
    for i, mask in enumerate(_masks(prefix, words)):
        if mask == 0:
            continue
        if not first:
            program.append((BPF_MISC | BPF_TAX, 0, 0, 0))  # X = A
        program.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_NET_OFF + offset + 4 * i) & 0xFFFFFFFF))
        program.append((BPF_ALU | BPF_AND | BPF_K, 0, 0, mask))
        if not first:
            program.append((BPF_ALU | BPF_XOR | BPF_X, 0, 0, 0))  # A ^= X
        first = False
    if first:  # prefix 0: every source is one "source"
        program.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_NET_OFF + offset) & 0xFFFFFFFF))
        program.append((BPF_ALU | BPF_AND | BPF_K, 0, 0, 0))
    program += [
        (BPF_ALU | BPF_MUL | BPF_K, 0, 0, GOLDEN),
        (BPF_ALU | BPF_RSH | BPF_K, 0, 0, 16),
        (BPF_ALU | BPF_MOD | BPF_K, 0, 0, groups),
        (BPF_RET | BPF_A, 0, 0, 0),
    ]
    return program


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, listener: ListenerConfig, groups: int) -> None:
    """Attach the steering program for `listener` to `sock` (one of `groups` workers' sockets)."""
    program = bpf_program(sock.family, source_prefix(listener, sock.family), groups)
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code)
    fprog = _SockFprog(len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def detach(sock: socket.socket) -> None:
    """Back to the kernel's own spread (a reload turned the per-client state off)."""
    with contextlib.suppress(OSError):  # ENOENT: nothing attached
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
