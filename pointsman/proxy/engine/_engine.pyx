# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled connection engine: pyengine.py's state machine with the per-connection work in C.

Read pyengine.py first: this file is the same design, function for function (the names match),
with connection state in C fields (`Conn`, no Python objects per connection beyond itself), the
byte moving done with direct syscalls, a C array from descriptor to connection, and records
packed into a C buffer per listener. Only what the policy needs crosses into Python: the accept
decision, the preamble bytes, the connect outcome, and one packed record buffer per wake-up.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject_AsFileDescriptor
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.math cimport log as c_log
from libc.string cimport memcpy, memset

from pointsman.proxy.engine._sys cimport *

import array as _array
import os as _os
import logging
import mmap as _mmap
import socket as _socket
import weakref as _weakref

from pointsman.proxy.engine.api import (
    ACCEPT_BACKOFF,
    ACCEPT_BATCH,
    EARLY_DATA_MAX,
    ENGINE_ERROR,
    NEVER,
    POLICY_ERROR,
    PIPE_SIZE,
    READ_CHUNK,
    CONNECTED,
    RECORD,
    TICK,
    WAKE_BUDGET,
    Connect,
    End,
    EngineStatistics,
    Hold,
    Keepalive,
    ListenerCounters,
    ReadPreamble,
    Refuse,
    set_keepalive,
    set_nodelay,
)

log = logging.getLogger("pointsman.engine")

NAME = "cython"

cdef extern from *:
    """
    #include <errno.h>
    static inline void set_errno(int e) { errno = e; }
    """
    void set_errno(int e) nogil


cdef enum:
    SLOTS = 4096
    MAX_EVENTS = 256
    S_PREAMBLE = 0
    S_CONNECTING = 1
    S_RELAY = 2
    S_DRAIN = 3
    S_DONE = 4
    S_HELD = 5  # Hold: nothing read, nothing connected, until resume()
    R_OK = 0
    R_SRC = 1
    R_DST = 2
    # What a side's hang-up flag (c_hup, b_hup) says (pyengine: HUP_FIN, HUP_ERR)
    H_FIN = 1  # its FIN came (RDHUP) and nothing worse
    H_ERR = 2  # EPOLLHUP or EPOLLERR too: a reset, or both ways shut
    # End (api.py)
    E_CLIENT_FIN = 1
    E_BACKEND_FIN = 2
    E_CLIENT_RESET = 3
    E_BACKEND_RESET = 4
    E_IDLE_TIMEOUT = 5
    E_HALF_CLOSE_TIMEOUT = 6
    E_CONNECT_FAILED = 7
    E_LOCAL_RESOURCE = 8
    E_REFUSED = 9
    E_CLOSED = 10
    E_CLIENT_TIMEOUT = 11
    E_BACKEND_TIMEOUT = 12
    # Flag (api.py)
    F_CLIENT_FIN = 1
    F_BACKEND_FIN = 2
    F_CLIENT_RESET = 4
    F_BACKEND_RESET = 8
    F_CONNECTED = 16
    F_SPLICED = 32
    F_QUIET = 64
    # Status, Op (api.py)
    ST_OK = 0
    ST_BACKEND = 1
    ST_LOCAL = 2
    OP_SOCKET = 0
    OP_BIND = 1
    OP_CONNECT = 2
    OP_PIPE = 3
    ERRNO_SLOTS = 256
    IP_TRANSPARENT = 19
    SIOCOUTQNSD = 0x894B
    LISTENER_BIT = 1 << 31

cdef int64_t C_NEVER = NEVER
cdef Py_ssize_t C_READ_CHUNK = READ_CHUNK
cdef Py_ssize_t C_EARLY_MAX = EARLY_DATA_MAX
cdef Py_ssize_t C_BUDGET = WAKE_BUDGET
cdef int C_ACCEPT_BATCH = ACCEPT_BATCH
cdef int64_t C_TICK_NS = <int64_t>(TICK * 1e9)
cdef int64_t C_BACKOFF_NS = <int64_t>(ACCEPT_BACKOFF * 1e9)
cdef int C_PIPE_SIZE = PIPE_SIZE
cdef int C_PAGE_SIZE = _mmap.PAGESIZE
cdef Py_ssize_t RECORD_SIZE = RECORD.size
assert sizeof(Connected) == CONNECTED.size
cdef unsigned int SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
cdef uint32_t CONN_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
cdef uint32_t READ_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
cdef uint32_t HUP_EVENTS = EPOLLRDHUP | EPOLLHUP
cdef uint32_t ERR_EVENTS = EPOLLHUP | EPOLLERR
cdef uint32_t WRITE_EVENTS = EPOLLOUT | EPOLLERR | EPOLLHUP


# --- the engine waits for uvloop -------------------------------------------------------------------
# Under uvloop, a wake-up through an add_reader on the engine's epoll costs uvloop's iteration and
# a Python call: about 1 us per keep-alive request at 32 connections (docs/engine.md, "The engine
# waits for uvloop"). So where it can, the engine turns the nesting round: uvloop's epoll goes
# inside the engine's, and the engine blocks in its own epoll_wait for both, as long as uvloop
# has no callback ready and no timer due (libuv's uv_backend_timeout). When uvloop's descriptor
# reads ready, a timer is due or a callback is queued, the engine rings a bell (an eventfd that
# uvloop watches) and returns: uvloop runs its iteration and calls the engine again. The libuv
# functions come from uvloop's own module (it exports them), the uv_loop_t from the first field
# of its Loop, checked before use; anything else (another loop, an unknown uvloop build, a
# second engine on the loop, POINTSMAN_ENGINE_WAIT=loop) keeps the add_reader.

ctypedef int (*uv_loop_int)(const void*) noexcept nogil
ctypedef void (*uv_loop_void)(void*) noexcept nogil

cdef int TICK_MS = <int>(TICK * 1000)
cdef uint64_t LOOP_TAG = 1ULL << 63  # the event of uvloop's descriptor in the engine's epoll
_waiting = _weakref.WeakSet()  # the loops an engine waits for (one engine per loop)


cdef extern from "Python.h":
    ctypedef struct PyThreadState
    ctypedef struct PyInterpreterState
    PyInterpreterState* PyInterpreterState_Get()
    PyThreadState* PyInterpreterState_ThreadHead(PyInterpreterState*)
    PyThreadState* PyThreadState_Next(PyThreadState*)


cdef inline bint alone() noexcept:
    """True when this is the interpreter's only thread (the executor's come and go)."""
    return PyThreadState_Next(PyInterpreterState_ThreadHead(PyInterpreterState_Get())) == NULL


cdef struct LoopHook:
    void* uvl  # uvloop's uv_loop_t, or NULL: the add_reader way
    int fd  # uvloop's epoll descriptor
    int bell  # an eventfd in uvloop's epoll: readable while the engine wants its turn
    uv_loop_int backend_timeout
    uv_loop_void update_time


cdef int hook_uvloop(object loop, LoopHook* hook) except -1:
    """Fill `hook` when the engine can wait for `loop`; leave hook.uvl NULL otherwise."""
    cdef void* lib
    cdef void* uvl
    cdef uv_loop_int backend_fd
    hook.uvl = NULL
    hook.bell = -1
    if _os.environ.get("POINTSMAN_ENGINE_WAIT", "engine") != "engine":
        return 0
    try:
        from uvloop import loop as uvloop_module
    except ImportError:
        return 0
    if not isinstance(loop, uvloop_module.Loop) or loop in _waiting:
        return 0
    lib = dlopen(_os.fsencode(uvloop_module.__file__), RTLD_NOW | RTLD_NOLOAD)
    if lib == NULL:
        return 0
    backend_fd = <uv_loop_int>dlsym(lib, "uv_backend_fd")
    hook.backend_timeout = <uv_loop_int>dlsym(lib, "uv_backend_timeout")
    hook.update_time = <uv_loop_void>dlsym(lib, "uv_update_time")
    if backend_fd == NULL or hook.backend_timeout == NULL or hook.update_time == NULL:
        return 0
    # Loop's first field after the object head and Cython's method table is `uv_loop_t *uvloop`,
    # and the first field of that (`data`) points back at the Loop. Should a uvloop build put
    # something else there: small integers are no address, and an object's head is not the loop.
    if type(loop).__basicsize__ < <Py_ssize_t>(sizeof(PyObject) + 2 * sizeof(void*)):
        return 0
    uvl = (<void**>(<char*><PyObject*>loop + sizeof(PyObject) + sizeof(void*)))[0]
    if <size_t>uvl < 65536 or <size_t>uvl % sizeof(void*) or (<void**>uvl)[0] != <void*>loop:
        return 0
    hook.fd = backend_fd(uvl)
    if hook.fd < 0 or hook.fd != loop._get_backend_id():
        return 0
    hook.uvl = uvl
    return 0


cdef struct Dir:
    char* buf  # bytes read from the source not yet taken by the destination (malloc'ed)
    Py_ssize_t off
    Py_ssize_t len
    Py_ssize_t cap
    int pipe_r
    int pipe_w
    Py_ssize_t pipe_len
    Py_ssize_t pipe_slots  # the pipe's capacity in buffers (pages): see _pump_splice
    uint8_t eof
    uint8_t fin_sent


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline bint is_local(int op, int err) noexcept:
    if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM or err == EADDRNOTAVAIL:
        return True
    return (op == OP_BIND and err == EADDRINUSE) or op == OP_PIPE


cdef inline socklen_t addr_len(SockAddr* a) noexcept:
    return sizeof(sockaddr_in6) if a.sa.sa_family == AF_INET6 else sizeof(sockaddr_in)


cdef str addr_host(SockAddr* a):
    cdef char text[48]
    if a.sa.sa_family == AF_INET6:
        inet_ntop(AF_INET6, &a.v6.sin6_addr, text, 48)
    else:
        inet_ntop(AF_INET, &a.v4.sin_addr, text, 48)
    return text.decode("ascii")


cdef inline int addr_port(SockAddr* a) noexcept:
    if a.sa.sa_family == AF_INET6:
        return ntohs(a.v6.sin6_port)
    return ntohs(a.v4.sin_port)


cdef object addr_tuple(SockAddr* a):
    if a.sa.sa_family == AF_INET6:
        return (addr_host(a), ntohs(a.v6.sin6_port), ntohl(a.v6.sin6_flowinfo), a.v6.sin6_scope_id)
    return (addr_host(a), ntohs(a.v4.sin_port))


cdef inline Py_ssize_t pipe_slots(int wfd) noexcept:
    """Make the pipe PIPE_SIZE when allowed; its capacity in buffers either way (0: unknown)."""
    cdef int size = fcntl(wfd, F_SETPIPE_SZ, C_PIPE_SIZE)
    if size < 0:
        size = fcntl(wfd, F_GETPIPE_SZ)
    return size // C_PAGE_SIZE if size > 0 else 0


cdef inline void dir_free(Dir* d) noexcept:
    if d.buf != NULL:
        free(d.buf)
    d.buf = NULL
    d.off = 0
    d.len = 0
    d.cap = 0


cdef inline void dir_release(Dir* d) noexcept:
    if d.pipe_r >= 0:
        close(d.pipe_r)
        close(d.pipe_w)
        d.pipe_r = d.pipe_w = -1
        d.pipe_len = 0
    dir_free(d)


cdef int dir_append(Dir* d, const char* data, Py_ssize_t n) except -1:
    """Add `n` bytes after what is pending (compacting first)."""
    cdef char* grown
    if d.off and d.len:
        memcpy(d.buf, d.buf + d.off, d.len)  # non-overlapping: off >= len never holds otherwise
    elif d.off:
        d.len = 0
    d.off = 0
    if d.len + n > d.cap:
        grown = <char*>realloc(d.buf, d.len + n)
        if grown == NULL:
            raise MemoryError()
        d.buf = grown
        d.cap = d.len + n
    memcpy(d.buf + d.len, data, n)
    d.len += n
    return 0


@cython.final
cdef class Load:
    """The live load of one backend, shared by the targets made with the same `load` key
    (see pyengine.Load)."""

    cdef Py_ssize_t active
    cdef object __weakref__


@cython.final
cdef class CTarget:
    """A backend address and per-pool settings, parsed once (see pyengine.PyTarget)."""

    cdef readonly int backend
    cdef readonly str host
    cdef readonly int port
    cdef SockAddr addr
    cdef SockAddr src
    cdef bint has_src
    cdef bint transparent
    cdef bint nodelay
    cdef int ka_idle  # 0: no keepalive; else TCP_KEEPIDLE, with ka_interval and ka_count
    cdef int ka_interval
    cdef int ka_count
    cdef int64_t connect_ns
    cdef int64_t idle_ns
    cdef int64_t half_close_ns
    cdef int64_t splice_after
    cdef readonly bint quiet  # a success is counted in `connected`, not reported (api.py)
    cdef readonly uint64_t connected
    cdef Load load  # its backend's connections, not ended, shared (pyengine.PyTarget)

    def __init__(self, int backend, str host, int port, source, bint transparent,
                 double connect_timeout, double idle_timeout, double half_close_timeout,
                 splice_after, bint nodelay, keepalive, bint quiet=False, Load load=None):
        parse_addr(host, port, &self.addr)
        if keepalive is not None:
            keepalive = Keepalive(*keepalive).check()
            self.ka_idle, self.ka_interval, self.ka_count = keepalive
        self.has_src = source is not None
        if self.has_src:
            parse_addr(source, 0, &self.src)
            if self.src.sa.sa_family != self.addr.sa.sa_family:
                raise ValueError("source and backend must be the same IP version")
        self.backend = backend
        self.host = host
        self.port = port
        self.transparent = transparent
        self.nodelay = nodelay
        self.connect_ns = <int64_t>(connect_timeout * 1e9)
        self.idle_ns = <int64_t>(idle_timeout * 1e9)
        self.half_close_ns = <int64_t>(half_close_timeout * 1e9)
        self.splice_after = C_NEVER if splice_after is None else splice_after
        self.quiet = quiet
        self.load = Load() if load is None else load

    @property
    def active(self):
        """The connections to its backend through it and every target sharing its load."""
        return self.load.active

    def __repr__(self):
        return f"CTarget({self.backend}, {self.host!r}, {self.port})"


cdef struct Packed:
    # Fixed-size entries appended in C and handed to Python as one bytes per wake-up.
    char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef char* packed_add(Packed* packed, Py_ssize_t size) except NULL:
    """Room for one more entry of `size` bytes at the end (the buffer doubles, from 64)."""
    cdef char* grown
    cdef Py_ssize_t cap
    if packed.len + size > packed.cap:
        cap = max(packed.cap * 2, 64 * size)
        grown = <char*>realloc(packed.data, cap)
        if grown == NULL:
            raise MemoryError()
        packed.data = grown
        packed.cap = cap
    cdef char* entry = packed.data + packed.len
    packed.len += size
    return entry


cdef bytes packed_take(Packed* packed):
    """The entries so far, as bytes; the buffer is empty again (its memory kept)."""
    cdef bytes taken = PyBytes_FromStringAndSize(packed.data, packed.len)
    packed.len = 0
    return taken


@cython.final
cdef tuple _weights(object weights, object targets):
    """pyengine._weights: a table's weights, one per target."""
    if weights is None:
        return None
    if len(weights) != len(targets) or min(weights) <= 0:
        raise ValueError("fast table weights: one above 0 per target")
    return tuple([float(w) for w in weights])


cdef class Listener:
    cdef int id
    cdef int fd
    cdef object sock
    cdef object on_accept
    cdef object on_preamble
    cdef object on_connect
    cdef object on_ended
    cdef object on_accept_error  # optional: policy.accept_error(errno)
    cdef object on_admitted  # optional: policy.admitted(batch), for the fast path
    cdef object on_connected  # optional: policy.connected(entries), quiet successes
    # Fast admission (set_fast): while `credit` lasts and `watch.snapshot is snapshot`, a new
    # connection goes to the next of `fast` without a call; `admits` holds them for the policy.
    cdef tuple fast
    cdef tuple weights  # least connections, a weighted source hash: one per entry of fast
    # A hash pool (Maglev): slot -> index into fast, int32 each (None: no hashing), and whether
    # the client's port is part of the key (hash_key: source_ip_port).
    cdef bytes lookup
    cdef bint key_port
    cdef tuple names  # source hash: each target's backend id, UTF-8 (None: not rendezvous)
    cdef bytes ends  # power of two: the weights' running sums, doubles (None: not sampled)
    cdef Py_ssize_t fast_next
    cdef Py_ssize_t credit
    cdef object watch
    cdef object snapshot
    cdef list admits
    cdef bint nodelay
    cdef bint paused
    cdef bint stopped
    cdef bint dirty
    cdef Packed records  # api.RECORD each, handed over in `ended`
    # Quiet successes (api.CONNECTED) not yet handed over; `connecting`: in the engine's list.
    cdef bint connecting
    cdef Packed connects
    cdef uint64_t accepted, refused, ended, active, bytes_in, bytes_out, spliced, accept_errors

    def __dealloc__(self):
        free(self.records.data)
        free(self.connects.data)

    cdef Record* new_record(self) except NULL:
        return <Record*>packed_add(&self.records, RECORD_SIZE)

    cdef Connected* new_connected(self) except NULL:
        return <Connected*>packed_add(&self.connects, sizeof(Connected))


@cython.final
@cython.freelist(256)
@cython.no_gc  # no cycles but the wheel links, which _wheel_remove breaks at every end
cdef class Conn:
    cdef uint64_t id
    cdef Listener lst
    cdef CTarget target
    cdef object first  # bytes to send before the held ones (a PROXY header), or None
    cdef object preamble  # the ReadPreamble decision while reading one
    cdef Conn tnext
    cdef Conn tprev
    cdef int cfd
    cdef int bfd
    cdef uint8_t state, c_rd, c_wr, c_hup, b_rd, b_wr, b_hup
    cdef uint8_t halfclosed, drain_up, reason, first_fin, flags, last_status
    cdef int kill
    cdef int last_err
    cdef int tslot
    cdef int64_t tdue
    cdef int64_t t_start, t_attempt, t_connect, t_first, last, drain_deadline, preamble_deadline
    cdef int64_t splice_after
    cdef uint64_t bytes_in, bytes_out
    cdef int preamble_max
    cdef Dir up
    cdef Dir down
    cdef SockAddr peer

    def __dealloc__(self):
        dir_free(&self.up)
        dir_free(&self.down)


cdef inline void set_linger_reset(int fd) noexcept:
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef bytes _lookup(object lookup, object targets):
    """pyengine._lookup: a hash table's slots as int32s, each an index into `targets`."""
    if lookup is None:
        return None
    table = _array.array("i", lookup)
    if not table or min(table) < 0 or max(table) >= len(targets):
        raise ValueError("hash lookup: every slot an index into the targets")
    return table.tobytes()


cdef tuple _names(object names, object targets):
    """pyengine._names: a rendezvous table's backend ids, one (bytes) per target."""
    if names is None:
        return None
    names = tuple(names)
    if len(names) != len(targets) or any(type(name) is not bytes for name in names):
        raise ValueError("rendezvous names: one bytes per target")
    return names


# XXH64 (Yann Collet's xxHash, 64-bit), the hash balance/hashing.py's stable_hash64 is: the
# engine hashes the client's key itself so that its pick is the hash pickers', to the bit.
cdef extern from *:
    """
    #define XXH_P1 0x9E3779B185EBCA87ULL
    #define XXH_P2 0xC2B2AE3D27D4EB4FULL
    #define XXH_P3 0x165667B19E3779F9ULL
    #define XXH_P4 0x85EBCA77C2B2AE63ULL
    #define XXH_P5 0x27D4EB2F165667C5ULL
    """
    const uint64_t P1 "XXH_P1"
    const uint64_t P2 "XXH_P2"
    const uint64_t P3 "XXH_P3"
    const uint64_t P4 "XXH_P4"
    const uint64_t P5 "XXH_P5"

cdef double TO_UNIT = 2.0 ** -53  # source_hash._TO_UNIT: a 53-bit hash into (0, 1)


cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc += lane * P2
    return _rotl(acc, 31) * P1


cdef inline uint64_t _merge(uint64_t h, uint64_t v) noexcept nogil:
    h ^= _round(0, v)
    return h * P1 + P4


cdef uint64_t xxh64(const uint8_t* p, size_t n, uint64_t seed) noexcept nogil:
    """XXH64 of the n bytes at p (little-endian lanes, as on the x86 and arm64 we build for)."""
    cdef const uint8_t* end = p + n
    cdef uint64_t h, v1, v2, v3, v4, lane
    cdef uint32_t half
    if n >= 32:
        v1 = seed + P1 + P2
        v2 = seed + P2
        v3 = seed
        v4 = seed - P1
        while p + 32 <= end:
            memcpy(&lane, p, 8)
            v1 = _round(v1, lane)
            memcpy(&lane, p + 8, 8)
            v2 = _round(v2, lane)
            memcpy(&lane, p + 16, 8)
            v3 = _round(v3, lane)
            memcpy(&lane, p + 24, 8)
            v4 = _round(v4, lane)
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(_merge(_merge(_merge(h, v1), v2), v3), v4)
    else:
        h = seed + P5
    h += n
    while p + 8 <= end:
        memcpy(&lane, p, 8)
        h ^= _round(0, lane)
        h = _rotl(h, 27) * P1 + P4
        p += 8
    if p + 4 <= end:
        memcpy(&half, p, 4)
        h ^= <uint64_t>half * P1
        h = _rotl(h, 23) * P2 + P3
        p += 4
    while p < end:
        h ^= p[0] * P5
        h = _rotl(h, 11) * P1
        p += 1
    h ^= h >> 33
    h *= P2
    h ^= h >> 29
    h *= P3
    h ^= h >> 32
    return h


def _xxh64(bytes data, uint64_t seed=0):
    """xxh64 for the tests (against the xxhash package)."""
    return xxh64(<const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), seed)


cdef CTarget _hashed(Listener lst, SockAddr* peer):
    """pyengine._hashed: the Maglev table's target for the client's key."""
    cdef uint8_t key[18]
    cdef size_t n = _key(lst, peer, key)
    cdef const int32_t* table = <const int32_t*>PyBytes_AS_STRING(lst.lookup)
    cdef uint64_t size = <uint64_t>(PyBytes_GET_SIZE(lst.lookup) // 4)
    return <CTarget>lst.fast[table[xxh64(key, n, 0) % size]]


cdef CTarget _rendezvous(Listener lst, SockAddr* peer):
    """pyengine._rendezvous: balance/source_hash.py's pick, the same hashes and scores."""
    cdef uint8_t key[18]
    cdef size_t n = _key(lst, peer, key)
    cdef uint64_t seed = xxh64(key, n, 0), h, best_hash = 0
    cdef tuple names = lst.names
    cdef tuple weights = lst.weights
    cdef Py_ssize_t i, best = -1
    cdef double score, best_score = 0.0
    cdef bytes name
    for i in range(len(names)):
        name = <bytes>names[i]
        h = xxh64(<const uint8_t*>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), seed)
        if weights is None:  # equal weights: the hash itself ranks
            if best < 0 or h > best_hash:
                best, best_hash = i, h
        else:
            score = -<double>weights[i] / c_log(((h >> 11) + 0.5) * TO_UNIT)
            if best < 0 or score > best_score:
                best, best_score = i, score
    return <CTarget>lst.fast[best]


cdef size_t _key(Listener lst, SockAddr* peer, uint8_t* key) noexcept:
    """The client's key into `key` (18 bytes at most), as hashing.source_key makes it: the
    packed address, an IPv4-mapped IPv6 one as IPv4, then the port for source_ip_port."""
    cdef size_t n
    cdef const uint8_t* a
    cdef uint16_t port
    if peer.sa.sa_family == AF_INET:
        memcpy(key, &peer.v4.sin_addr, 4)
        n = 4
        port = peer.v4.sin_port  # network order: the key's big-endian bytes
    else:
        a = <const uint8_t*>&peer.v6.sin6_addr
        if _mapped(a):
            memcpy(key, a + 12, 4)
            n = 4
        else:
            memcpy(key, a, 16)
            n = 16
        port = peer.v6.sin6_port
    if lst.key_port:
        memcpy(key + n, &port, 2)
        n += 2
    return n


cdef inline bint _mapped(const uint8_t* a) noexcept:
    """::ffff:a.b.c.d"""
    cdef int i
    for i in range(10):
        if a[i]:
            return False
    return a[10] == 0xFF and a[11] == 0xFF


cdef bytes _ends(tuple weights):
    """pyengine._ends: the running sums of a power-of-two table's weights."""
    if weights is None:
        raise ValueError("a sampled table needs its weights")
    ends = _array.array("d")
    cdef double total = 0.0
    for weight in weights:
        total += <double>weight
        ends.append(total)
    return ends.tobytes()


cdef uint64_t _rng = 0  # xorshift64*'s state, seeded at import (below)


cdef inline double _uniform() noexcept:
    """A double in [0, 1) from xorshift64* (Vigna): the top 53 bits of its output."""
    global _rng
    _rng ^= _rng >> 12
    _rng ^= _rng << 25
    _rng ^= _rng >> 27
    return <double>((_rng * 0x2545F4914F6CDD1DULL) >> 11) * TO_UNIT


cdef inline Py_ssize_t _bisect(const double* ends, Py_ssize_t n, double x) noexcept:
    """bisect_right: the first index whose running sum is above x."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if x < ends[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef CTarget _two(Listener lst):
    """pyengine._two: balance/power_of_two.py's pick with the engine's own random numbers and
    its own count of each target's connections: two distinct weighted samples, the lower
    active / weight wins, the first on a tie."""
    cdef tuple fast = lst.fast
    cdef tuple weights = lst.weights
    cdef Py_ssize_t count = len(fast), first, second
    if count == 1:
        return <CTarget>fast[0]
    cdef const double* ends = <const double*>PyBytes_AS_STRING(lst.ends)
    cdef double total = ends[count - 1], first_weight, point
    first = min(_bisect(ends, count, _uniform() * total), count - 1)
    first_weight = <double>weights[first]
    point = _uniform() * (total - first_weight)  # from the weight left once `first` is out
    if point >= (ends[first - 1] if first else 0.0):
        point += first_weight
    second = min(_bisect(ends, count, point), count - 1)
    if second == first:  # only by float rounding at an interval edge
        second = first + 1 if first + 1 < count else first - 1
    cdef CTarget a = <CTarget>fast[first], b = <CTarget>fast[second]
    if b.load.active / <double>weights[second] < a.load.active / first_weight:
        return b
    return a


_rng = int.from_bytes(_os.urandom(8), "little") | 1  # never 0: xorshift would stay there


cdef CTarget _least(Listener lst):
    """pyengine._least: the fewest active connections per weight, the first in scan order on
    a tie; the next scan starts one past the winner."""
    cdef tuple fast = lst.fast
    cdef tuple weights = lst.weights
    cdef Py_ssize_t count = len(fast), position = lst.fast_next, best = -1, k
    cdef double score, best_score = 0.0
    for k in range(count):
        score = (<CTarget>fast[position]).load.active / <double>weights[position]
        if best < 0 or score < best_score:
            best = position
            best_score = score
        position += 1
        if position == count:
            position = 0
    lst.fast_next = best + 1 if best + 1 < count else 0
    return <CTarget>fast[best]


@cython.final
cdef class CEngine:
    """Owns TCP connections' I/O on one event loop; the same API as pyengine.PyEngine."""

    cdef readonly str name
    cdef object loop
    cdef int epfd
    cdef epoll_event events[MAX_EVENTS]
    cdef PyObject** fdmap  # fd -> Conn (borrowed: `conns` owns them)
    cdef int fdcap
    cdef dict conns
    cdef dict listeners
    cdef dict lfds  # listening fd -> Listener
    cdef uint64_t next_id
    cdef int next_lid
    cdef char* rbuf
    cdef int64_t now
    cdef list slots
    cdef int64_t wheel_tick
    cdef Py_ssize_t wheel_count
    cdef set draining
    cdef list again
    cdef list kills
    cdef list dirty
    cdef list admitting  # listeners with fast admissions not yet handed over
    cdef list connecting  # listeners with quiet successes not yet handed over
    cdef list paused
    cdef int64_t resume_at
    cdef int busy
    cdef object tick_handle
    cdef object soon
    cdef int* closing
    cdef int closing_len
    cdef int closing_cap
    cdef uint64_t accept_errs[ERRNO_SLOTS]
    cdef uint64_t local_errs[4][ERRNO_SLOTS]
    cdef bint closed
    cdef LoopHook hook
    cdef bint loop_ready  # uvloop's descriptor read ready in this poll (see LoopHook)
    cdef object _on_ready_cb, _tick_cb, _again_cb
    cdef object loads  # the backends' loads by the policy's key, while a target holds one

    def __cinit__(self):
        self.epfd = -1
        self.fdmap = NULL
        self.rbuf = NULL
        self.closing = NULL

    def __init__(self, loop):
        self.name = NAME
        self.loop = loop
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.rbuf = <char*>malloc(C_READ_CHUNK)
        self.fdcap = 1024
        self.fdmap = <PyObject**>malloc(self.fdcap * sizeof(PyObject*))
        self.closing_cap = 256
        self.closing = <int*>malloc(self.closing_cap * sizeof(int))
        if self.rbuf == NULL or self.fdmap == NULL or self.closing == NULL:
            raise MemoryError()
        memset(self.fdmap, 0, self.fdcap * sizeof(PyObject*))
        memset(self.accept_errs, 0, sizeof(self.accept_errs))
        memset(self.local_errs, 0, sizeof(self.local_errs))
        self.conns = {}
        self.listeners = {}
        self.lfds = {}
        self.next_id = 1
        self.now = now_ns()
        self.slots = [None] * SLOTS
        self.wheel_tick = self.now // C_TICK_NS
        self.draining = set()
        self.again = []
        self.kills = []
        self.dirty = []
        self.connecting = []
        self.admitting = []
        self.paused = []
        self._on_ready_cb = self._on_ready
        self._tick_cb = self._tick
        self._again_cb = self._run_again
        self.loads = _weakref.WeakValueDictionary()
        hook_uvloop(loop, &self.hook)
        if self.hook.uvl != NULL:
            self._wait_for(loop)
        else:
            loop.add_reader(self.epfd, self._on_ready_cb)

    cdef int _wait_for(self, object loop) except -1:
        """uvloop's epoll inside the engine's, and the bell in uvloop's (see LoopHook)."""
        cdef epoll_event ev
        cdef int err
        self.hook.bell = eventfd(1, EFD_NONBLOCK | EFD_CLOEXEC)  # rung: the first turn comes
        if self.hook.bell < 0:
            raise OSError(errno, "eventfd")
        ev.events = EPOLLIN
        ev.data.u64 = LOOP_TAG
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.hook.fd, &ev) < 0:
            err = errno
            close(self.hook.bell)
            self.hook.bell = -1
            raise OSError(err, "epoll_ctl")
        loop.add_reader(self.hook.bell, self._on_bell)
        _waiting.add(loop)
        return 0

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        free(self.rbuf)
        free(self.fdmap)
        free(self.closing)

    # --- the public API ---------------------------------------------------------------------------

    @property
    def waits_for_loop(self):
        """True when the engine waits for uvloop in its own epoll (see LoopHook)."""
        return self.hook.uvl != NULL

    def target(self, int backend, str host, int port, *, source=None, bint transparent=False,
               double connect_timeout=5.0, double idle_timeout=300.0,
               double half_close_timeout=30.0, splice_after=None, bint nodelay=True,
               keepalive=None, bint quiet=False, load=None):
        """pyengine.PyEngine.target: targets made with the same `load` key share one count."""
        cdef Load shared = None
        if load is not None:
            shared = self.loads.get(load)
            if shared is None:
                shared = Load()
                self.loads[load] = shared
        return CTarget(backend, host, port, source, transparent, connect_timeout, idle_timeout,
                       half_close_timeout, splice_after, nodelay, keepalive, quiet, shared)

    def add_listener(self, sock, policy, *, bint nodelay=True, keepalive=None):
        cdef Listener lst = Listener()
        cdef epoll_event ev
        # On the listening socket (accepted sockets inherit it); None turns it off (pyengine).
        set_keepalive(sock, None if keepalive is None else Keepalive(*keepalive).check())
        inherited = set_nodelay(sock, nodelay)  # accepted sockets inherit it (pyengine)
        sock.setblocking(False)
        lst.id = self.next_lid
        self.next_lid += 1
        lst.sock = sock
        lst.fd = sock.fileno()
        lst.on_accept = policy.accepted
        lst.on_preamble = policy.preamble
        lst.on_connect = policy.connect_result
        lst.on_ended = policy.ended
        lst.on_accept_error = getattr(policy, "accept_error", None)
        lst.on_admitted = getattr(policy, "admitted", None)
        lst.on_connected = getattr(policy, "connected", None)
        lst.admits = []
        lst.nodelay = nodelay and not inherited
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>lst.fd | (<uint64_t>1 << 32)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, lst.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")
        self.listeners[lst.id] = lst
        self.lfds[lst.fd] = lst
        return lst.id

    def set_listener_keepalive(self, int lid, keepalive):
        cdef Listener lst = self.listeners[lid]
        set_keepalive(lst.sock, None if keepalive is None else Keepalive(*keepalive).check())

    def stop_listener(self, int lid):
        cdef Listener lst = self.listeners[lid]
        if lst.stopped:
            return
        lst.stopped = True
        if not lst.paused:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, lst.fd, NULL)
        self.lfds.pop(lst.fd, None)

    def set_fast(self, int lid, targets=None, Py_ssize_t start=0, Py_ssize_t credit=0,
                 watch=None, snapshot=None, weights=None, lookup=None, bint key_port=False,
                 names=None, bint sampled=False):
        """Fast admission for a listener (pyengine.set_fast): None turns it off."""
        cdef Listener lst = self.listeners[lid]
        self._flush_admits(lst)
        if not targets or lst.on_admitted is None:
            lst.fast = lst.weights = lst.lookup = lst.names = lst.ends = None
            lst.credit = 0
            lst.watch = lst.snapshot = None
            return
        for target in targets:
            if type(target) is not CTarget:
                raise TypeError("fast targets are this engine's targets")
        lst.weights = _weights(weights, targets)
        lst.lookup = _lookup(lookup, targets)
        lst.names = _names(names, targets)
        lst.ends = _ends(lst.weights) if sampled else None
        lst.key_port = key_port
        lst.fast = tuple(targets)
        lst.fast_next = start % len(lst.fast)
        lst.credit = credit
        lst.watch = watch
        lst.snapshot = snapshot

    def set_credit(self, int lid, Py_ssize_t credit):
        """pyengine.set_credit: returns what is left of the credit it replaces."""
        cdef Listener lst = <Listener>self.listeners[lid]
        cdef Py_ssize_t left = lst.credit
        lst.credit = credit
        return left

    def pause_listener(self, int lid):
        """Accept nothing for ACCEPT_BACKOFF or until a connection closes (pyengine)."""
        cdef Listener lst = self.listeners[lid]
        if not lst.stopped:
            self._pause(lst)
            self._after_call()

    def close(self, uint64_t conn_id, int code):
        cdef Conn conn = self.conns.get(conn_id)
        if conn is None:
            return False
        self._cut(conn, code)
        self._after_call()
        return True

    def resume(self, uint64_t conn_id, object decision):
        """Continue a held connection (pyengine.resume)."""
        cdef Conn conn = self.conns.get(conn_id)
        if conn is None or conn.state != S_HELD:
            return False
        conn.state = S_PREAMBLE
        self.busy += 1
        try:
            self._apply(conn, decision)
        except Exception:
            log.exception("engine: internal error on connection %d; it is cut", conn_id)
            if conn.state != S_DONE:
                self._end(conn, E_CLOSED, ENGINE_ERROR, True, True)
        finally:
            self.busy -= 1
        self._after_call()
        return True

    def close_backend(self, int backend, int code):
        cdef Conn conn
        victims = [c for c in self.conns.values()
                   if (<Conn>c).target is not None and (<Conn>c).target.backend == backend]
        for conn in victims:
            self._cut(conn, code)
        self._after_call()
        return len(victims)

    def close_all(self, int code, listener=None):
        cdef Conn conn
        victims = [c for c in self.conns.values() if listener is None or (<Conn>c).lst.id == listener]
        for conn in victims:
            self._cut(conn, code)
        self._after_call()
        return len(victims)

    def active(self, listener=None):
        if listener is None:
            return len(self.conns)
        return (<Listener>self.listeners[listener]).active

    def sockname(self, uint64_t conn_id):
        cdef Conn conn = self.conns.get(conn_id)
        cdef SockAddr a
        cdef socklen_t n = sizeof(SockAddr)
        if conn is None or conn.cfd < 0:
            return None
        if getsockname(conn.cfd, &a.sa, &n) < 0:
            return None
        return (addr_host(&a), addr_port(&a))

    def buffered(self, uint64_t conn_id):
        cdef Conn conn = self.conns.get(conn_id)
        if conn is None:
            return None
        return (conn.up.len + conn.up.pipe_len, conn.down.len + conn.down.pipe_len)

    def is_connected(self, uint64_t conn_id):
        cdef Conn conn = self.conns.get(conn_id)
        return conn is not None and conn.t_connect != 0

    def connections(self):
        return list(self.conns)

    def listener_stats(self, int lid):
        cdef Listener lst = self.listeners[lid]
        return ListenerCounters(lst.accepted, lst.refused, lst.ended, lst.active, lst.bytes_in,
                                lst.bytes_out, lst.spliced, lst.accept_errors)

    def statistics(self):
        cdef int op, err
        accept = {err: self.accept_errs[err] for err in range(ERRNO_SLOTS) if self.accept_errs[err]}
        local = {(op, err): self.local_errs[op][err] for op in range(4) for err in range(ERRNO_SLOTS)
                 if self.local_errs[op][err]}
        return EngineStatistics(accept, local, len(self.conns))

    def shutdown(self, int code):
        if self.closed:
            return 0
        for lid in list(self.listeners):
            self.stop_listener(lid)
        cut = self.close_all(code)
        self._close_now()
        self.closed = True
        if self.hook.uvl != NULL:
            self.loop.remove_reader(self.hook.bell)
            close(self.hook.bell)
            _waiting.discard(self.loop)
        else:
            self.loop.remove_reader(self.epfd)
        for handle in (self.tick_handle, self.soon):
            if handle is not None:
                handle.cancel()
        close(self.epfd)
        self.epfd = -1
        return cut

    # --- wake-ups ---------------------------------------------------------------------------------

    def _on_ready(self):
        cdef int n, rounds
        self.busy += 1
        try:
            self.now = now_ns()
            for rounds in range(4):
                n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
                if n < 0:
                    if errno == EINTR:
                        continue
                    raise OSError(errno, "epoll_wait")
                self._events(n)
                self._close_now()
                if n == 0:
                    break
            self._sweep()
        finally:
            self.busy -= 1
            self._after_call()

    def _on_bell(self):
        """The engine's turn when it waits for uvloop (see LoopHook): wait in the engine's epoll,
        for its own events and uvloop's descriptor, while uvloop has nothing else to do."""
        cdef uint64_t rung
        cdef int n, timeout = 0
        cdef int64_t until = -1, left
        read(self.hook.bell, &rung, sizeof(rung))
        if self.loop.get_debug():  # uvloop times each callback: stay under its slow mark
            until = now_ns() + <int64_t>(self.loop.slow_callback_duration * 0.5e9)
        self.busy += 1
        try:
            while True:
                if not timeout:
                    n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
                else:
                    if alone():  # no other thread can want the GIL meanwhile
                        n = epoll_wait(self.epfd, self.events, MAX_EVENTS, timeout)
                    else:
                        with nogil:  # the executor's threads run, as in uvloop's own wait
                            n = epoll_wait(self.epfd, self.events, MAX_EVENTS, timeout)
                    # libuv's clock stopped with the wait: call_later in the policy's calls
                    self.hook.update_time(self.hook.uvl)
                if n < 0:
                    if errno == EINTR:  # a signal: its Python handler runs in uvloop's turn
                        break
                    raise OSError(errno, "epoll_wait")
                self.now = now_ns()
                self.loop_ready = False
                self._events(n)
                self._close_now()
                self._sweep()
                if self.loop_ready:
                    break
                self.busy -= 1
                try:
                    self._after_call()  # what the policy must see, our call_soon and call_later
                finally:
                    self.busy += 1
                if self.closed:
                    break
                self.hook.update_time(self.hook.uvl)
                timeout = self.hook.backend_timeout(self.hook.uvl)
                if timeout == 0:
                    break
                if self._sweeping() and not 0 < timeout <= TICK_MS:  # the tick, without call_later
                    timeout = TICK_MS
                if until >= 0:
                    left = (until - now_ns()) // 1000000
                    if left <= 0:
                        break
                    if timeout < 0 or timeout > left:
                        timeout = <int>left
        finally:
            self.busy -= 1
            self._after_call()
            if not self.closed:
                rung = 1
                write(self.hook.bell, &rung, sizeof(rung))

    cdef int _events(self, int n) except -1:
        """Handle one poll's events; one connection's bug must not stall the batch: its
        connection is cut and the rest go on. The try is entered once per poll, not per event
        (Cython saves and restores the exception state at each entry)."""
        cdef int i = 0
        while i < n:
            try:
                while i < n:
                    self._event(self.events[i].data.u64, self.events[i].events)
                    i += 1
            except Exception:
                self._contain(self.events[i].data.u64)
                i += 1
        return 0

    def _run_again(self):
        cdef Conn conn
        self.soon = None
        self.busy += 1
        try:
            self.now = now_ns()
            again, self.again = self.again, []
            for conn in again:
                if conn.state != S_DONE:
                    self._advance(conn)
        finally:
            self.busy -= 1
            self._after_call()

    def _tick(self):
        self.tick_handle = None
        self.busy += 1
        try:
            self.now = now_ns()
            self._sweep()
        finally:
            self.busy -= 1
            self._after_call()

    cdef int _sweep(self) except -1:
        cdef Conn conn
        cdef int64_t tick = self.now // C_TICK_NS
        if tick > self.wheel_tick:  # at most once a tick: no list for the wake-ups in between
            for conn in self._wheel_expire(tick):
                self._expire(conn)
        if self.draining:
            for conn in list(self.draining):
                self._drain(conn)
        if self.paused and self.now >= self.resume_at:
            self._resume_listeners()
        return 0

    cdef int _after_call(self) except -1:
        cdef Conn conn
        if self.busy or self.closed:
            return 0
        while self.kills:
            kills, self.kills = self.kills, []
            for conn in kills:
                self._end(conn, E_CLOSED, conn.kill, True, True)
        self._close_now()
        self._flush_records()
        if self.again and self.soon is None:
            self.soon = self.loop.call_soon(self._again_cb)
        if self.tick_handle is None and self.hook.uvl == NULL and self._sweeping():
            self.tick_handle = self.loop.call_later(TICK, self._tick_cb)
        return 0

    cdef inline bint _sweeping(self) noexcept:
        """Timers, drains or a paused listener: the engine needs a turn every tick."""
        return self.wheel_count or self.draining or self.paused

    cdef int _close_now(self) except -1:
        cdef int i
        for i in range(self.closing_len):
            close(self.closing[i])
        self.closing_len = 0
        return 0

    cdef int _close(self, int fd, bint reset) except -1:
        """Close at the end of the poll round (see pyengine._close), a reset first if asked."""
        cdef int* grown
        if reset:
            set_linger_reset(fd)
        if fd < self.fdcap:
            self.fdmap[fd] = NULL
        if self.closing_len == self.closing_cap:
            grown = <int*>realloc(self.closing, 2 * self.closing_cap * sizeof(int))
            if grown == NULL:
                close(fd)
                return 0
            self.closing = grown
            self.closing_cap *= 2
        self.closing[self.closing_len] = fd
        self.closing_len += 1
        return 0

    cdef int _flush_records(self) except -1:
        cdef Listener lst
        while self.admitting or self.connecting or self.dirty:
            while self.admitting:  # before the rest: a fast connection may have ended already
                admitting, self.admitting = self.admitting, []
                for lst in admitting:
                    self._flush_admits(lst)
            while self.connecting:  # before the records: a connection may have ended already
                connecting, self.connecting = self.connecting, []
                for lst in connecting:
                    self._flush_connects(lst)
            dirty, self.dirty = self.dirty, []
            for lst in dirty:
                if lst.connects.len:  # connected and ended inside an earlier listener's `ended`
                    self._flush_connects(lst)
                records = packed_take(&lst.records)
                lst.dirty = False
                try:
                    lst.on_ended(records)
                except Exception:
                    log.exception("engine: policy.ended raised")
        return 0

    cdef int _map(self, int fd, Conn conn) except -1:
        cdef PyObject** grown
        cdef int cap
        if fd >= self.fdcap:
            cap = self.fdcap
            while cap <= fd:
                cap *= 2
            grown = <PyObject**>realloc(self.fdmap, cap * sizeof(PyObject*))
            if grown == NULL:
                raise MemoryError()
            memset(grown + self.fdcap, 0, (cap - self.fdcap) * sizeof(PyObject*))
            self.fdmap = grown
            self.fdcap = cap
        self.fdmap[fd] = <PyObject*>conn
        return 0

    cdef int _register(self, int fd, Conn conn) except -1:
        cdef epoll_event ev
        ev.events = CONN_EVENTS
        ev.data.u64 = <uint64_t>fd
        self._map(fd, conn)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            self.fdmap[fd] = NULL
            raise OSError(errno, "epoll_ctl")
        return 0

    cdef int _contain(self, uint64_t data) except -1:
        cdef int fd = <int><uint32_t>data  # low half (C, not a Python AND)
        cdef Conn conn
        log.exception("engine: internal error on descriptor %d; its connection is cut", fd)
        if data >> 32 or fd >= self.fdcap or self.fdmap[fd] == NULL:
            return 0
        conn = <Conn>self.fdmap[fd]
        if conn.state != S_DONE:
            self._end(conn, E_CLOSED, ENGINE_ERROR, True, True)
        return 0

    cdef int _event(self, uint64_t data, uint32_t mask) except -1:
        cdef int fd = <int><uint32_t>data  # low half (C, not a Python AND)
        cdef Conn conn
        if data >> 32:
            if data == LOOP_TAG:
                self.loop_ready = True
                return 0
            lst = self.lfds.get(fd)
            if lst is not None:
                self._accept(<Listener>lst)
            return 0
        if fd >= self.fdcap or self.fdmap[fd] == NULL:
            return 0
        conn = <Conn>self.fdmap[fd]
        if fd == conn.cfd:
            if mask & READ_EVENTS:
                conn.c_rd = 1
            if mask & HUP_EVENTS:
                conn.c_hup = H_ERR if mask & ERR_EVENTS or conn.c_hup == H_ERR else H_FIN
            if mask & WRITE_EVENTS:
                conn.c_wr = 1
            self._advance(conn)
            return 0
        if mask & READ_EVENTS:
            conn.b_rd = 1
        if mask & HUP_EVENTS:
            conn.b_hup = H_ERR if mask & ERR_EVENTS or conn.b_hup == H_ERR else H_FIN
        if mask & WRITE_EVENTS:
            conn.b_wr = 1
        if conn.state == S_CONNECTING:
            self._check_connect(conn, mask)
        else:
            self._advance(conn)
        return 0

    # --- accept -----------------------------------------------------------------------------------

    cdef int _accept(self, Listener lst) except -1:
        cdef SockAddr peer
        cdef socklen_t plen
        cdef int i, fd, err
        for i in range(C_ACCEPT_BATCH):
            plen = sizeof(SockAddr)
            fd = accept4(lst.fd, &peer.sa, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EAGAIN:
                    return 0
                if err == EINTR:
                    continue
                lst.accept_errors += 1
                self.accept_errs[err if err < ERRNO_SLOTS else 0] += 1
                if lst.on_accept_error is not None:
                    try:
                        lst.on_accept_error(err)
                    except Exception:
                        log.exception("engine: policy.accept_error raised")
                if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                    self._pause(lst)
                    return 0
                continue
            if lst.stopped:
                close(fd)
                return 0
            self._new_conn(lst, fd, &peer)
            if lst.paused:  # the policy asked for a pause (pause_listener)
                return 0
        return 0

    cdef int _pause(self, Listener lst) except -1:
        if lst.paused:
            return 0
        lst.paused = True
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, lst.fd, NULL)
        self.paused.append(lst)
        self.resume_at = self.now + C_BACKOFF_NS
        return 0

    cdef int _resume_listeners(self) except -1:
        cdef Listener lst
        cdef epoll_event ev
        paused, self.paused = self.paused, []
        for lst in paused:
            lst.paused = False
            if not lst.stopped:
                ev.events = EPOLLIN
                ev.data.u64 = <uint64_t>lst.fd | (<uint64_t>1 << 32)
                epoll_ctl(self.epfd, EPOLL_CTL_ADD, lst.fd, &ev)
        return 0

    cdef int _new_conn(self, Listener lst, int fd, SockAddr* peer) except -1:
        cdef int one = 1
        cdef Conn conn = Conn.__new__(Conn)
        if lst.nodelay:
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        conn.id = self.next_id
        self.next_id += 1
        conn.lst = lst
        conn.cfd = fd
        conn.bfd = -1
        conn.kill = -1
        conn.tslot = -1
        conn.up.pipe_r = conn.up.pipe_w = conn.down.pipe_r = conn.down.pipe_w = -1
        conn.t_start = conn.last = self.now
        conn.splice_after = C_NEVER
        memcpy(&conn.peer, peer, sizeof(SockAddr))
        lst.accepted += 1
        lst.active += 1
        self.conns[conn.id] = conn
        if lst.credit > 0 and lst.fast is not None and lst.watch.snapshot is lst.snapshot:
            return self._admit(lst, conn, peer)
        decision = self._call3(conn, lst.on_accept, conn.id, addr_host(peer), addr_port(peer))
        if conn.state == S_DONE:
            return 0
        try:
            if type(decision) is not Refuse:
                self._register(fd, conn)  # no read yet: see pyengine._new_conn
            self._apply(conn, decision)
        except Exception:  # the listener's event cannot name this connection: contain it here
            log.exception("engine: internal error on connection %d; it is cut", conn.id)
            if conn.state != S_DONE:
                self._end(conn, E_CLOSED, ENGINE_ERROR, True, True)
        return 0

    cdef int _admit(self, Listener lst, Conn conn, SockAddr* peer) except -1:
        """Fast admission: the next target of the listener's table, no policy call; the policy
        hears of it in `admitted` before any other call about this listener."""
        cdef CTarget target
        if lst.lookup is not None:
            target = _hashed(lst, peer)
        elif lst.names is not None:
            target = _rendezvous(lst, peer)
        elif lst.ends is not None:
            target = _two(lst)
        elif lst.weights is not None:
            target = _least(lst)
        else:
            target = <CTarget>lst.fast[lst.fast_next]
            lst.fast_next += 1
            if lst.fast_next == len(lst.fast):
                lst.fast_next = 0
        lst.credit -= 1
        lst.admits.append((conn.id, target.backend, conn.t_start, addr_host(peer),
                           addr_port(peer)))
        if len(lst.admits) == 1:
            self.admitting.append(lst)
        try:
            self._register(conn.cfd, conn)
            self._connect(conn, target, None, 0, None)
        except Exception:
            log.exception("engine: internal error on connection %d; it is cut", conn.id)
            if conn.state != S_DONE:
                self._end(conn, E_CLOSED, ENGINE_ERROR, True, True)
        return 0

    cdef int _flush_connects(self, Listener lst) except -1:
        """Hand the listener's quiet successes to its policy (after its admissions, before its
        records: the connections they name are still in its table)."""
        lst.connecting = False
        if not lst.connects.len:
            return 0
        entries = packed_take(&lst.connects)
        return self._hand(lst.on_connected, entries, "connected")

    cdef int _flush_admits(self, Listener lst) except -1:
        """Hand the listener's fast admissions to its policy (before any other call of it)."""
        if not lst.admits:
            return 0
        batch, lst.admits = lst.admits, []
        return self._hand(lst.on_admitted, batch, "admitted")

    cdef int _hand(self, object callback, object batch, str what) except -1:
        """One batch to the policy; a raise is logged (the batch is the policy's from now)."""
        self.busy += 1
        try:
            callback(batch)
        except Exception:
            log.exception("engine: policy.%s raised", what)
        finally:
            self.busy -= 1
        return 0

    cdef object _call3(self, Conn conn, object fn, object a, object b, object c):
        self._flush_admits(conn.lst)
        self.busy += 1
        try:
            result = fn(a, b, c)
        except Exception:
            log.exception("engine: policy raised; connection %d refused", conn.id)
            result = Refuse(POLICY_ERROR)
        finally:
            self.busy -= 1
        self._check_kill(conn)
        return result

    cdef object _call5(self, Conn conn, object fn, object a, object b, object c, object d, object e):
        self._flush_admits(conn.lst)
        self.busy += 1
        try:
            result = fn(a, b, c, d, e)
        except Exception:
            log.exception("engine: policy raised; connection %d refused", conn.id)
            result = Refuse(POLICY_ERROR)
        finally:
            self.busy -= 1
        self._check_kill(conn)
        return result

    cdef int _check_kill(self, Conn conn) except -1:
        if conn.kill >= 0 and conn.state != S_DONE:
            self._end(conn, E_CLOSED, conn.kill, True, True)
        return 0

    # --- decisions --------------------------------------------------------------------------------

    cdef int _apply(self, Conn conn, object decision) except -1:
        kind = type(decision)
        if kind is CTarget:
            return self._connect(conn, <CTarget>decision, None, 0, None)
        if kind is Connect:
            target = decision.target
            if type(target) is not CTarget:
                return self._policy_error(conn, decision)
            return self._connect(conn, <CTarget>target, decision.send_first, decision.consume,
                                 decision.source)
        if kind is Refuse:
            return self._end(conn, E_REFUSED, decision.code, False, True)
        if kind is ReadPreamble and conn.state == S_PREAMBLE and conn.preamble is None:
            conn.preamble = decision
            conn.preamble_max = decision.max_bytes
            conn.preamble_deadline = conn.t_start + <int64_t>(decision.timeout * 1e9)
            self._arm(conn)
            return self._read_preamble(conn)
        if kind is Hold and conn.state == S_PREAMBLE and conn.preamble is None:
            conn.state = S_HELD
            self._wheel_remove(conn)
            return self._check_held(conn)
        if decision is None and conn.last_err:
            return self._end(conn, E_LOCAL_RESOURCE if conn.last_status == ST_LOCAL
                             else E_CONNECT_FAILED, conn.last_err, False, False)
        return self._policy_error(conn, decision)

    cdef int _policy_error(self, Conn conn, object decision) except -1:
        log.error("engine: policy returned %r; connection %d refused", decision, conn.id)
        return self._end(conn, E_REFUSED, POLICY_ERROR, False, True)

    cdef int _read_preamble(self, Conn conn) except -1:
        if not self._hold(conn, conn.preamble_max):
            if conn.up.eof and conn.state == S_PREAMBLE:
                self._end(conn, E_CLIENT_FIN, 0, False, False)
            return 0
        data = PyBytes_FromStringAndSize(conn.up.buf + conn.up.off, conn.up.len)
        decision = self._preamble_call(conn, data)
        if conn.state == S_DONE:
            return 0
        if decision is None:
            if conn.up.len >= conn.preamble_max:
                self._end(conn, E_REFUSED, conn.preamble.overflow_code, False, False)
            elif conn.up.eof:
                self._end(conn, E_CLIENT_FIN, 0, False, False)
            return 0
        conn.preamble = None
        return self._apply(conn, decision)

    cdef object _preamble_call(self, Conn conn, bytes data):
        self._flush_admits(conn.lst)
        self.busy += 1
        try:
            result = conn.lst.on_preamble(conn.id, data)
        except Exception:
            log.exception("engine: policy raised; connection %d refused", conn.id)
            result = Refuse(POLICY_ERROR)
        finally:
            self.busy -= 1
        self._check_kill(conn)
        return result

    cdef bint _hold(self, Conn conn, Py_ssize_t limit) except -1:
        """Read the client into the up buffer before the backend takes it (pyengine._hold)."""
        cdef Dir* up = &conn.up
        cdef Py_ssize_t room, n
        cdef bint new = False
        while conn.c_rd and not up.eof:
            room = limit - up.len
            if room > C_READ_CHUNK:
                room = C_READ_CHUNK
            if room <= 0:
                break
            n = recv(conn.cfd, self.rbuf, room, 0)
            if n < 0:
                if errno == EAGAIN:
                    conn.c_rd = 0
                    break
                if errno == EINTR:
                    continue
                self._reset(conn, True, errno)
                return False
            if n == 0:
                up.eof = 1
                self._fin(conn, F_CLIENT_FIN)
                break
            dir_append(up, self.rbuf, n)
            conn.bytes_in += n
            conn.lst.bytes_in += n
            conn.last = self.now
            new = True
            if n < room and not conn.c_hup:
                conn.c_rd = 0
        return new

    # --- connect ----------------------------------------------------------------------------------

    cdef int _connect(self, Conn conn, CTarget target, object first, Py_ssize_t consume,
                      object source) except -1:
        cdef int err, op
        if conn.target is not None:  # a retry: the load moves
            conn.target.load.active -= 1
        target.load.active += 1
        conn.target = target
        conn.first = bytes(first) if first else None  # _connected reads it as bytes, unchecked
        if consume > 0 and conn.up.len:
            if consume > conn.up.len:
                consume = conn.up.len
            conn.up.off += consume
            conn.up.len -= consume
        conn.state = S_CONNECTING
        err = self._open(conn, target, source, &op)
        if err:
            return self._failed(conn, op, err)
        conn.t_attempt = self.now
        self._arm(conn)
        self._hold(conn, C_EARLY_MAX)
        return 0

    cdef int _open(self, Conn conn, CTarget target, object source, int* op) except -1:
        """Start a non-blocking connect: 0 when under way, else the errno (and `op`)."""
        cdef int fd, err, one = 1
        cdef SockAddr local
        cdef bint bind_it = False
        op[0] = OP_SOCKET
        fd = socket(target.addr.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            return errno or EIO
        if target.nodelay:
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        if target.ka_idle:
            setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &target.ka_idle, sizeof(int))
            setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &target.ka_interval, sizeof(int))
            setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &target.ka_count, sizeof(int))
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
        op[0] = OP_BIND
        if source is not None:
            try:
                parse_addr(source, 0, &local)
            except ValueError:
                close(fd)
                return EINVAL
            bind_it = True
        elif target.has_src:
            memcpy(&local, &target.src, sizeof(SockAddr))
            bind_it = True
        if target.transparent:
            if setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof(one)) < 0:
                err = errno
                close(fd)
                return err
            if not bind_it:
                memcpy(&local, &conn.peer, sizeof(SockAddr))
                bind_it = True
        if bind_it:
            if local.sa.sa_family == AF_INET6:
                local.v6.sin6_port = 0
            else:
                local.v4.sin_port = 0
            if bind(fd, &local.sa, addr_len(&local)) < 0:
                err = errno
                close(fd)
                return err
        op[0] = OP_CONNECT
        if connect(fd, &target.addr.sa, addr_len(&target.addr)) < 0 and errno != EINPROGRESS:
            err = errno
            close(fd)
            return err
        conn.bfd = fd
        conn.b_rd = conn.b_wr = conn.b_hup = 0
        self._register(fd, conn)
        return 0

    cdef int _check_connect(self, Conn conn, uint32_t mask) except -1:
        cdef int err = 0
        cdef socklen_t n = sizeof(err)
        if mask & (EPOLLERR | EPOLLHUP) or not mask & EPOLLOUT:
            getsockopt(conn.bfd, SOL_SOCKET, SO_ERROR, &err, &n)
            if not err and not mask & EPOLLOUT:
                return 0
        if err:
            self._drop_backend(conn, False)
            return self._failed(conn, OP_CONNECT, err)
        return self._connected(conn)

    cdef int _connected(self, Conn conn) except -1:
        cdef Dir* up = &conn.up
        cdef Py_ssize_t n
        cdef char* fresh
        cdef Listener lst
        cdef Connected* entry
        conn.state = S_RELAY
        conn.t_connect = self.now
        conn.flags |= F_CONNECTED
        conn.last = self.now
        conn.splice_after = conn.target.splice_after
        if conn.target.quiet:
            conn.target.connected += 1
            conn.flags |= F_QUIET
            lst = conn.lst
            if lst.on_connected is not None:
                if not lst.connecting:
                    lst.connecting = True
                    self.connecting.append(lst)
                entry = lst.new_connected()
                entry.conn_id = conn.id
                entry.backend = conn.target.backend
                entry.elapsed = self.now - conn.t_attempt
        else:
            self._call5(conn, conn.lst.on_connect, conn.id, conn.target.backend, ST_OK, 0,
                        (self.now - conn.t_attempt) / 1e9)
            if conn.state == S_DONE:
                return 0
        if conn.first is not None:
            first = <bytes>conn.first
            n = PyBytes_GET_SIZE(first)
            fresh = <char*>malloc(n + up.len)
            if fresh == NULL:
                raise MemoryError()
            memcpy(fresh, PyBytes_AS_STRING(first), n)
            if up.len:
                memcpy(fresh + n, up.buf + up.off, up.len)
            n += up.len
            dir_free(up)
            up.buf = fresh
            up.len = up.cap = n
            conn.first = None
        self._arm(conn)
        return self._advance(conn)

    cdef int _failed(self, Conn conn, int op, int err) except -1:
        cdef int status = ST_LOCAL if is_local(op, err) else ST_BACKEND
        if status == ST_LOCAL:
            self.local_errs[op][err if err < ERRNO_SLOTS else 0] += 1
        conn.last_err = err
        conn.last_status = status
        elapsed = (self.now - conn.t_attempt) / 1e9 if conn.t_attempt else 0.0
        decision = self._call5(conn, conn.lst.on_connect, conn.id, conn.target.backend, status,
                               err, elapsed)
        if conn.state == S_DONE:
            return 0
        conn.t_attempt = 0
        return self._apply(conn, decision)

    cdef int _drop_backend(self, Conn conn, bint reset) except -1:
        if conn.bfd >= 0:
            self._close(conn.bfd, reset)
            conn.bfd = -1
        return 0

    # --- relay ------------------------------------------------------------------------------------

    cdef int _advance(self, Conn conn) except -1:
        cdef uint8_t state = conn.state
        if state == S_RELAY:
            return self._relay(conn)
        if state == S_CONNECTING:
            self._hold(conn, C_EARLY_MAX)
        elif state == S_PREAMBLE:
            if conn.preamble is not None:
                self._read_preamble(conn)
        elif state == S_DRAIN:
            self._drain(conn)
        elif state == S_HELD:
            self._check_held(conn)
        return 0

    cdef int _check_held(self, Conn conn) except -1:
        """A held client that hung up (FIN or reset) has given up: it ends now (pyengine)."""
        cdef int err = 0
        cdef socklen_t n = sizeof(err)
        if not (conn.c_hup or conn.up.eof):
            return 0
        getsockopt(conn.cfd, SOL_SOCKET, SO_ERROR, &err, &n)
        if err:
            return self._reset(conn, True, err)
        self._fin(conn, F_CLIENT_FIN)
        return self._end(conn, E_CLIENT_FIN, 0, False, False)

    cdef int _relay(self, Conn conn) except -1:
        cdef int result = self._pump(conn, &conn.up, conn.cfd, conn.bfd, &conn.c_rd, &conn.c_hup,
                                     &conn.b_wr, True)
        # A reset result comes straight from the failed call: errno is still its error.
        if result != R_OK:
            return self._reset(conn, result == R_SRC, errno)
        result = self._pump(conn, &conn.down, conn.bfd, conn.cfd, &conn.b_rd, &conn.b_hup,
                            &conn.c_wr, False)
        if result != R_OK:
            return self._reset(conn, result == R_DST, errno)
        if conn.up.fin_sent and conn.down.fin_sent:
            return self._end(conn, E_CLIENT_FIN if conn.first_fin == F_CLIENT_FIN else E_BACKEND_FIN,
                             0, False, False)
        if (<int64_t>(conn.bytes_in + conn.bytes_out) >= conn.splice_after and conn.up.pipe_r < 0
                and self._to_splice(conn)):
            return self._relay(conn)
        return 0

    cdef int _pump(self, Conn conn, Dir* d, int src, int dst, uint8_t* src_rd, uint8_t* src_hup,
                   uint8_t* dst_wr, bint up) except -1:
        """Move src -> dst until one would block (pyengine._pump): R_OK, R_SRC or R_DST."""
        cdef Py_ssize_t n, w, moved = 0
        cdef int more, failed
        if d.pipe_r >= 0:
            return self._pump_splice(conn, d, src, dst, src_rd, src_hup, dst_wr, up)
        while True:
            if d.len:
                if not dst_wr[0]:
                    return R_OK
                # After the source's FIN, the FIN goes on the last segment (pyengine._pump)
                n = send(dst, d.buf + d.off, d.len, MSG_NOSIGNAL | (MSG_MORE if d.eof else 0))
                if n < 0:
                    if errno == EAGAIN:
                        dst_wr[0] = 0
                        return R_OK
                    if errno == EINTR:
                        continue
                    return R_DST
                conn.last = self.now
                d.off += n
                d.len -= n
                if d.len:
                    dst_wr[0] = 0
                    return R_OK
                dir_free(d)
            if d.eof:
                return self._forward_fin(conn, d, dst)
            if not src_rd[0]:
                return R_OK
            if moved >= C_BUDGET:
                self.again.append(conn)
                return R_OK
            n = recv(src, self.rbuf, C_READ_CHUNK, 0)
            if n < 0:
                if errno == EAGAIN:
                    src_rd[0] = 0
                    return R_OK
                if errno == EINTR:
                    continue
                return R_SRC
            if n == 0:
                d.eof = 1
                self._fin(conn, F_CLIENT_FIN if up else F_BACKEND_FIN)
                continue
            moved += n
            self._count(conn, n, up)
            more = failed = 0
            if n < C_READ_CHUNK:
                if not src_hup[0]:
                    src_rd[0] = 0
                elif src_hup[0] == H_FIN:  # the end is next: read it first (pyengine._read_end)
                    w = recv(src, self.rbuf + n, C_READ_CHUNK - n, 0)
                    if w == 0:
                        more = MSG_MORE
                        d.eof = 1
                        self._fin(conn, F_CLIENT_FIN if up else F_BACKEND_FIN)
                    elif w > 0:
                        moved += w
                        self._count(conn, w, up)
                        n += w
                    elif errno != EAGAIN and errno != EINTR:
                        failed = errno
            w = 0
            if dst_wr[0]:  # straight from the read buffer: no copy unless the destination is full
                w = send(dst, self.rbuf, n, MSG_NOSIGNAL | more)
                if w < 0:
                    if errno == EAGAIN:
                        dst_wr[0] = 0
                    elif errno != EINTR:
                        return R_DST
                    w = 0
            if w < n:
                dir_append(d, self.rbuf + w, n - w)
                if w:
                    dst_wr[0] = 0
            if failed:  # reset after the data: what was read went on first
                set_errno(failed)
                return R_SRC

    cdef int _forward_fin(self, Conn conn, Dir* d, int dst) except -1:
        cdef Dir* other = &conn.down if d == &conn.up else &conn.up
        if not d.fin_sent:
            if other.fin_sent:  # the last FIN: the close that follows sends it (one syscall less)
                d.fin_sent = 1
                return R_OK
            if shutdown(dst, SHUT_WR) < 0:
                return R_DST
            d.fin_sent = 1
            if not conn.halfclosed:
                conn.halfclosed = 1
                self._arm(conn)
        return R_OK

    cdef int _pump_splice(self, Conn conn, Dir* d, int src, int dst, uint8_t* src_rd,
                          uint8_t* src_hup, uint8_t* dst_wr, bint up) except -1:
        cdef Py_ssize_t n, moved = 0
        while True:
            if d.pipe_len:
                if not dst_wr[0]:
                    return R_OK
                n = splice(d.pipe_r, NULL, dst, NULL, d.pipe_len, SPLICE_FLAGS)
                if n < 0:
                    if errno == EAGAIN:
                        dst_wr[0] = 0
                        return R_OK
                    if errno == EINTR:
                        continue
                    return R_DST
                conn.last = self.now
                d.pipe_len -= n
                if d.pipe_len:
                    continue
            if d.eof:
                return self._forward_fin(conn, d, dst)
            if not src_rd[0]:
                return R_OK
            if moved >= C_BUDGET:
                self.again.append(conn)
                return R_OK
            n = splice(src, NULL, d.pipe_w, NULL, C_PIPE_SIZE, SPLICE_FLAGS)
            if n < 0:
                if errno == EAGAIN:
                    src_rd[0] = 0
                    return R_OK
                if errno == EINTR:
                    continue
                return R_SRC
            if n == 0:
                d.eof = 1
                self._fin(conn, F_CLIENT_FIN if up else F_BACKEND_FIN)
                continue
            moved += n
            d.pipe_len += n
            self._count(conn, n, up)
            if n < d.pipe_slots and not src_hup[0]:  # drained (pyengine._pump_splice says why)
                src_rd[0] = 0

    cdef bint _to_splice(self, Conn conn) except -1:
        cdef int fds[4]
        cdef int err
        if conn.up.len or conn.down.len:
            return False
        conn.splice_after = C_NEVER
        if conn.up.eof or conn.down.eof:
            return False
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            err = errno
            self.local_errs[OP_PIPE][err if err < ERRNO_SLOTS else 0] += 1
            return False
        if pipe2(fds + 2, O_NONBLOCK | O_CLOEXEC) < 0:
            err = errno
            close(fds[0])
            close(fds[1])
            self.local_errs[OP_PIPE][err if err < ERRNO_SLOTS else 0] += 1
            return False
        up_slots = pipe_slots(fds[1])  # best effort: the default 64 KiB works, slower
        down_slots = pipe_slots(fds[3])
        dir_free(&conn.up)
        dir_free(&conn.down)
        conn.up.pipe_r = fds[0]
        conn.up.pipe_w = fds[1]
        conn.down.pipe_r = fds[2]
        conn.down.pipe_w = fds[3]
        conn.up.pipe_slots = up_slots
        conn.down.pipe_slots = down_slots
        conn.flags |= F_SPLICED
        conn.lst.spliced += 1
        return True

    cdef inline int _count(self, Conn conn, Py_ssize_t n, bint up) except -1:
        if up:
            conn.bytes_in += n
            conn.lst.bytes_in += n
        else:
            if not conn.t_first:
                conn.t_first = self.now
            conn.bytes_out += n
            conn.lst.bytes_out += n
        conn.last = self.now
        return 0

    cdef inline int _fin(self, Conn conn, uint8_t which) except -1:
        conn.flags |= which
        if not conn.first_fin:
            conn.first_fin = which
        return 0

    # --- resets -----------------------------------------------------------------------------------

    cdef int _reset(self, Conn conn, bint client, int err) except -1:
        """One side reset (pyengine._reset): drain what it sent to the other, then reset that."""
        conn.flags |= F_CLIENT_RESET if client else F_BACKEND_RESET
        cdef uint8_t reason = E_CLIENT_RESET if client else E_BACKEND_RESET
        if err == ETIMEDOUT:
            reason = E_CLIENT_TIMEOUT if client else E_BACKEND_TIMEOUT
        if conn.state != S_RELAY:
            return self._end(conn, reason, 0, not client, client)
        conn.state = S_DRAIN
        conn.reason = reason
        conn.drain_up = client
        self._salvage(conn, conn.cfd if client else conn.bfd, client)
        if client:
            self._close(conn.cfd, False)
            conn.cfd = -1
        else:
            self._close(conn.bfd, False)
            conn.bfd = -1
        cdef CTarget target = conn.target
        cdef int64_t span = target.half_close_ns or target.idle_ns  # in C, no Python ints
        if not span:
            span = 30000000000
        conn.drain_deadline = self.now + span
        self.draining.add(conn)
        self._arm(conn)
        return self._drain(conn)

    cdef int _salvage(self, Conn conn, int fd, bint up) except -1:
        """pyengine._salvage: what the reset side's kernel still holds from it, after what is
        buffered (a reset found by a failed write or FIN towards it)."""
        cdef Dir* d = &conn.up if up else &conn.down
        cdef Py_ssize_t n
        if d.eof:
            return 0
        while True:
            n = recv(fd, self.rbuf, C_READ_CHUNK, 0)
            if n < 0:
                if errno == EINTR:
                    continue
                return 0  # nothing more (EAGAIN), or the reset itself
            if n == 0:
                return 0
            self._count(conn, n, up)
            dir_append(d, self.rbuf, n)

    cdef int _drain(self, Conn conn) except -1:
        cdef Dir* d = &conn.up if conn.drain_up else &conn.down
        cdef int survivor = conn.bfd if conn.drain_up else conn.cfd
        cdef Py_ssize_t n
        cdef int unsent = 0
        while d.len or d.pipe_len:
            if d.pipe_len:
                n = splice(d.pipe_r, NULL, survivor, NULL, d.pipe_len, SPLICE_FLAGS)
            else:
                n = send(survivor, d.buf + d.off, d.len, MSG_NOSIGNAL)
            if n < 0:
                if errno == EAGAIN or errno == EINTR:
                    return 0
                break  # the survivor is gone too
            if d.pipe_len:
                d.pipe_len -= n
            else:
                d.off += n
                d.len -= n
        else:
            if ioctl(survivor, SIOCOUTQNSD, &unsent) < 0:
                unsent = 0
            if unsent > 0 and self.now < conn.drain_deadline:
                return 0
        return self._end(conn, conn.reason, 0, True, True)

    # --- timers -----------------------------------------------------------------------------------

    cdef int64_t _due(self, Conn conn) noexcept:
        cdef uint8_t state = conn.state
        cdef int64_t span
        if state == S_RELAY:
            span = conn.target.idle_ns
            if conn.halfclosed and conn.target.half_close_ns:
                span = conn.target.half_close_ns
            return conn.last + span if span else 0
        if state == S_CONNECTING:
            return conn.t_attempt + conn.target.connect_ns
        if state == S_PREAMBLE:
            return conn.preamble_deadline if conn.preamble is not None else 0
        if state == S_DRAIN:
            return conn.drain_deadline
        return 0

    cdef int _arm(self, Conn conn) except -1:
        cdef int64_t due = self._due(conn)
        if due:
            self._wheel_file(conn, (due + C_TICK_NS - 1) // C_TICK_NS)
        else:
            self._wheel_remove(conn)
        return 0

    cdef int _wheel_file(self, Conn conn, int64_t due) except -1:
        cdef Conn head
        self._wheel_remove(conn)
        if due <= self.wheel_tick:
            due = self.wheel_tick + 1
        conn.tdue = due
        conn.tslot = due % SLOTS
        head = self.slots[conn.tslot]
        conn.tnext = head
        conn.tprev = None
        if head is not None:
            head.tprev = conn
        self.slots[conn.tslot] = conn
        self.wheel_count += 1
        return 0

    cdef int _wheel_remove(self, Conn conn) except -1:
        if conn.tslot < 0:
            return 0
        if conn.tprev is None:
            self.slots[conn.tslot] = conn.tnext
        else:
            conn.tprev.tnext = conn.tnext
        if conn.tnext is not None:
            conn.tnext.tprev = conn.tprev
        conn.tnext = None
        conn.tprev = None
        conn.tslot = -1
        self.wheel_count -= 1
        return 0

    cdef list _wheel_expire(self, int64_t now):
        cdef list due = []
        cdef int64_t steps, step
        cdef Conn conn, nxt
        if now <= self.wheel_tick or not self.wheel_count:
            if now > self.wheel_tick:
                self.wheel_tick = now
            return due
        steps = now - self.wheel_tick
        if steps > SLOTS:
            steps = SLOTS
        for step in range(1, steps + 1):
            conn = self.slots[(self.wheel_tick + step) % SLOTS]
            while conn is not None:
                nxt = conn.tnext
                if conn.tdue <= now:
                    self._wheel_remove(conn)
                    due.append(conn)
                conn = nxt
        self.wheel_tick = now
        return due

    cdef int _expire(self, Conn conn) except -1:
        cdef int64_t due = self._due(conn)
        cdef uint8_t state = conn.state
        if not due:
            return 0
        if due > self.now:
            return self._arm(conn)
        if state == S_RELAY:
            if conn.halfclosed and conn.target.half_close_ns:  # pyengine._expire says why
                return self._end(conn, E_HALF_CLOSE_TIMEOUT, 0, True, True)
            return self._end(conn, E_IDLE_TIMEOUT, 0, False, False)
        if state == S_CONNECTING:
            self._drop_backend(conn, True)
            return self._failed(conn, OP_CONNECT, ETIMEDOUT)
        if state == S_PREAMBLE:
            return self._end(conn, E_REFUSED, conn.preamble.timeout_code, False, False)
        if state == S_DRAIN:
            return self._end(conn, conn.reason, 0, True, True)
        return 0

    # --- the end ----------------------------------------------------------------------------------

    cdef int _cut(self, Conn conn, int code) except -1:
        if self.busy:
            conn.kill = code
            self.kills.append(conn)
            return 0
        return self._end(conn, E_CLOSED, code, True, True)

    cdef int _end(self, Conn conn, uint8_t reason, int detail, bint rst_client,
                  bint rst_backend) except -1:
        cdef Listener lst
        cdef Record* rec
        if conn.state == S_DONE:
            return 0
        conn.state = S_DONE
        self._wheel_remove(conn)
        if self.draining:
            self.draining.discard(conn)
        if conn.cfd >= 0:
            self._close(conn.cfd, rst_client)
            conn.cfd = -1
        if conn.bfd >= 0:
            self._close(conn.bfd, rst_backend)
            conn.bfd = -1
        dir_release(&conn.up)
        dir_release(&conn.down)
        conn.first = None
        conn.preamble = None
        if conn.target is not None:
            conn.target.load.active -= 1
        lst = conn.lst
        lst.active -= 1
        if reason == E_REFUSED:
            lst.refused += 1
        else:
            lst.ended += 1
        if not lst.dirty:
            lst.dirty = True
            self.dirty.append(lst)
        rec = lst.new_record()
        rec.conn_id = conn.id
        rec.backend = conn.target.backend if conn.target is not None else -1
        rec.reason = reason
        rec.flags = conn.flags
        rec.detail = <uint16_t>(detail & 0xFFFF)
        rec.bytes_in = conn.bytes_in
        rec.bytes_out = conn.bytes_out
        rec.started = conn.t_start
        rec.connected = conn.t_connect
        rec.first_byte = conn.t_first
        rec.ended = self.now
        rec.listener = lst.id
        rec.attempt = conn.t_attempt if conn.t_connect else 0
        del self.conns[conn.id]
        if self.paused:
            self._resume_listeners()
        return 0


# --- UDP in batches ---------------------------------------------------------------------------------

cdef enum:
    BATCH_MAX = 1024

cdef char* _rx_buf = NULL
cdef Py_ssize_t _rx_size = 0
cdef int _rx_count = 0
cdef mmsghdr* _rx_msgs = NULL
cdef iovec* _rx_iov = NULL
cdef SockAddr* _rx_addrs = NULL


cdef int _rx_ensure(int count, Py_ssize_t size) except -1:
    """One receive area per process, grown to the largest batch asked for."""
    global _rx_buf, _rx_size, _rx_count, _rx_msgs, _rx_iov, _rx_addrs
    if count <= _rx_count and size <= _rx_size:
        return 0
    count = max(count, _rx_count)
    size = max(size, _rx_size)
    free(_rx_buf)
    free(_rx_msgs)
    free(_rx_iov)
    free(_rx_addrs)
    _rx_buf = <char*>malloc(count * size)
    _rx_msgs = <mmsghdr*>malloc(count * sizeof(mmsghdr))
    _rx_iov = <iovec*>malloc(count * sizeof(iovec))
    _rx_addrs = <SockAddr*>malloc(count * sizeof(SockAddr))
    if _rx_buf == NULL or _rx_msgs == NULL or _rx_iov == NULL or _rx_addrs == NULL:
        _rx_count = 0
        _rx_size = 0
        raise MemoryError()
    _rx_count = count
    _rx_size = size
    return 0


def recv_batch(sock, int max_messages, Py_ssize_t size=65535):
    """Up to `max_messages` datagrams waiting on the non-blocking socket `sock` (a descriptor or
    a socket), with one recvmmsg(2): a list of (payload, address), addresses as the socket
    module gives them."""
    cdef int i, n
    cdef int fd = PyObject_AsFileDescriptor(sock)
    if max_messages <= 0:
        return []
    if max_messages > BATCH_MAX:
        max_messages = BATCH_MAX
    _rx_ensure(max_messages, size)
    fill_rx(_rx_msgs, _rx_iov, _rx_addrs, _rx_buf, _rx_size, size, max_messages)
    n = recvmmsg(fd, _rx_msgs, max_messages, MSG_DONTWAIT, NULL)
    if n < 0:
        if errno == EAGAIN or errno == EINTR:
            return []
        raise OSError(errno, "recvmmsg")
    out = []
    for i in range(n):
        out.append((PyBytes_FromStringAndSize(<char*>_rx_iov[i].iov_base, _rx_msgs[i].msg_len),
                    addr_tuple(&_rx_addrs[i])))
    return out


def send_batch(sock, messages):
    """Send (payload, address) pairs in order with sendmmsg(2) (address None: a connected
    socket) on `sock` (a descriptor or a socket); how many went. Stops where the socket would
    block; an error on the first message raises, on a later one the count so far is returned
    (pybatch.send_batch)."""
    cdef int fd = PyObject_AsFileDescriptor(sock)
    cdef Py_ssize_t count = len(messages), i, done = 0
    cdef int n, chunk
    cdef mmsghdr* msgs
    cdef iovec* iov
    cdef SockAddr* addrs
    if count == 0:
        return 0
    chunk = count if count < BATCH_MAX else BATCH_MAX
    msgs = <mmsghdr*>malloc(chunk * sizeof(mmsghdr))
    iov = <iovec*>malloc(chunk * sizeof(iovec))
    addrs = <SockAddr*>malloc(chunk * sizeof(SockAddr))
    if msgs == NULL or iov == NULL or addrs == NULL:
        free(msgs)
        free(iov)
        free(addrs)
        raise MemoryError()
    keep = []  # payloads stay alive while the kernel reads them
    try:
        while done < count:
            chunk = min(count - done, BATCH_MAX)
            for i in range(chunk):
                payload, addr = messages[done + i]
                if not isinstance(payload, bytes):
                    payload = bytes(payload)
                keep.append(payload)
                iov[i].iov_base = PyBytes_AS_STRING(payload)
                iov[i].iov_len = PyBytes_GET_SIZE(payload)
                memset(&msgs[i], 0, sizeof(mmsghdr))
                msgs[i].msg_hdr.msg_iov = &iov[i]
                msgs[i].msg_hdr.msg_iovlen = 1
                if addr is not None:
                    parse_addr(addr[0], addr[1], &addrs[i])
                    msgs[i].msg_hdr.msg_name = &addrs[i]
                    msgs[i].msg_hdr.msg_namelen = addr_len(&addrs[i])
            n = sendmmsg(fd, msgs, chunk, MSG_DONTWAIT)
            if n < 0:
                if errno == EAGAIN or errno == EINTR:
                    break
                if done == 0:
                    raise OSError(errno, "sendmmsg")
                break
            done += n
            keep.clear()
            if n < chunk:
                break
    finally:
        free(msgs)
        free(iov)
        free(addrs)
    return done
