# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled UDP forwarding plane: udpfast.PyUdpPlane's contract with the per-datagram work in C.

Read pointsman/proxy/udpfast.py first (the contract and the reference). Here a session is a C
struct in one array (its slot), found from (listening socket, client address) through an
open-addressing hash table of slots; the listening sockets and the sessions' sockets are in the
plane's own epoll set (level-triggered; the listener watches its descriptor with one add_reader).
A wake-up reads a batch from each ready socket: from a listening socket with one recvmmsg(2),
each known session's datagrams of the batch leaving in one sendmmsg(2) on its connected socket;
from a session's socket with one recvmmsg, its replies leaving in one sendmmsg to the client
from the listening socket. Python sees one call per wake-up and one tuple back.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.object cimport PyObject_AsFileDescriptor
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memset

from pointsman.proxy.engine._sys cimport *


cdef extern from "<errno.h>" nogil:
    enum:
        ECONNREFUSED
        EOPNOTSUPP
        EMSGSIZE


cdef extern from "<sys/socket.h>" nogil:
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    unsigned char* CMSG_DATA(cmsghdr*)
    size_t CMSG_SPACE(size_t)
    size_t CMSG_LEN(size_t)


cdef extern from "<netinet/udp.h>" nogil:
    enum:
        SOL_UDP
        UDP_SEGMENT

cdef enum:
    BATCH = 64
    SIZE = 65535
    EVENTS = 256
    # UDP GSO: datagrams of one run (same size, the last may be shorter) leave as one buffer
    # that the kernel cuts back into the same datagrams. At most this many per run, and this
    # many payload bytes (an IPv4 datagram's largest payload).
    GSO_SEGMENTS = 64
    GSO_BYTES = 65507

# One receive area per process: forward() and replies() never nest.
cdef char* _buf = NULL
cdef mmsghdr _msgs[BATCH]
cdef iovec _iov[BATCH]
cdef SockAddr _addrs[BATCH]
cdef mmsghdr _tx[BATCH]
cdef int _tx_count[BATCH]  # datagrams in each message of _tx
cdef uint64_t _tx_bytes[BATCH]
cdef uint64_t _cmsg[BATCH][4]  # room for CMSG_SPACE(sizeof(uint16_t)) each, aligned
cdef iovec _giov[BATCH]  # one session's datagrams of a batch, in order
cdef int _gidx[BATCH]  # their index in the batch
cdef int _slot_of[BATCH]
cdef epoll_event _events[EVENTS]


cdef struct Sess:
    int used
    int lid
    int fd  # the session's connected socket (Python owns it)
    int dirty  # traffic since the last touched()
    int listed  # in the dirty list (until touched() empties it, even across remove/add)
    int answered
    uint32_t gen
    uint32_t hash
    double last
    uint64_t din
    uint64_t dout
    uint64_t bin
    uint64_t bout
    SockAddr client
    socklen_t clen


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint64_t mix(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= <uint64_t>0xff51afd7ed558ccd
    x ^= x >> 33
    x *= <uint64_t>0xc4ceb9fe1a85ec53
    x ^= x >> 33
    return x


cdef inline uint32_t key_hash(int lid, SockAddr* a) noexcept nogil:
    cdef const uint32_t* w
    if a.sa.sa_family == AF_INET6:
        w = <const uint32_t*>&a.v6.sin6_addr
        return <uint32_t>mix((<uint64_t>(w[0] ^ w[1] ^ w[2] ^ w[3]) << 32)
                             | (<uint64_t>a.v6.sin6_port << 16) | <uint64_t>(lid & 0xffff) | 1)
    return <uint32_t>mix((<uint64_t>a.v4.sin_addr.s_addr << 32) | (<uint64_t>a.v4.sin_port << 16)
                         | <uint64_t>(lid & 0xffff))


cdef inline bint same(Sess* s, int lid, SockAddr* a) noexcept nogil:
    if s.lid != lid or s.client.sa.sa_family != a.sa.sa_family:
        return False
    if a.sa.sa_family == AF_INET6:
        return s.client.v6.sin6_port == a.v6.sin6_port and \
            memcmp(&s.client.v6.sin6_addr, &a.v6.sin6_addr, 16) == 0
    return s.client.v4.sin_port == a.v4.sin_port and \
        s.client.v4.sin_addr.s_addr == a.v4.sin_addr.s_addr


cdef int _ensure_buf() except -1:
    global _buf
    if _buf == NULL:
        _buf = <char*>malloc(<size_t>BATCH * SIZE)
        if _buf == NULL:
            raise MemoryError()
    return 0


cdef object addr_tuple(SockAddr* a):
    cdef char text[48]
    if a.sa.sa_family == AF_INET6:
        inet_ntop(AF_INET6, &a.v6.sin6_addr, text, 48)
        return (text.decode("ascii"), ntohs(a.v6.sin6_port), ntohl(a.v6.sin6_flowinfo),
                a.v6.sin6_scope_id)
    inet_ntop(AF_INET, &a.v4.sin_addr, text, 48)
    return (text.decode("ascii"), ntohs(a.v4.sin_port))


cdef inline void prepare_rx(int count) noexcept nogil:
    fill_rx(_msgs, _iov, _addrs, _buf, SIZE, SIZE, count)


cdef class UdpPlane:
    """See udpfast.PyUdpPlane: same methods, same results."""

    cdef Sess* sess
    cdef int nsess  # slots allocated
    cdef int count  # slots in use
    cdef int* free_slots
    cdef int nfree
    cdef int* table  # slot or -1
    cdef uint32_t mask
    cdef int* dirty
    cdef int ndirty
    cdef int* lfds
    cdef int nlisten
    cdef int epfd
    cdef bint gso  # UDP_SEGMENT works here (off for good after the first refusal of it)
    cdef uint64_t totals[5]  # in, bytes in, out, bytes out, failed: of the current run()

    def __cinit__(self):
        _ensure_buf()
        self.gso = True
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.sess = NULL
        self.nsess = self.count = self.nfree = self.ndirty = self.nlisten = 0
        self.free_slots = self.dirty = self.lfds = NULL
        self.table = <int*>malloc(64 * sizeof(int))
        if self.table == NULL:
            raise MemoryError()
        memset(self.table, 0xff, 64 * sizeof(int))
        self.mask = 63

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        free(self.sess)
        free(self.free_slots)
        free(self.table)
        free(self.dirty)
        free(self.lfds)

    def __len__(self):
        return self.count

    def fileno(self):
        return self.epfd

    def close(self):
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    cdef int _watch(self, int fd, int64_t data) except -1:
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>data
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")
        return 0

    def listen(self, sock):
        cdef int fd = PyObject_AsFileDescriptor(sock)
        cdef int* grown = <int*>realloc(self.lfds, (self.nlisten + 1) * sizeof(int))
        if grown == NULL:
            raise MemoryError()
        self.lfds = grown
        self._watch(fd, -1 - <int64_t>self.nlisten)
        self.lfds[self.nlisten] = fd
        self.nlisten += 1
        return self.nlisten - 1

    cdef int _grow_slots(self) except -1:
        cdef int n = self.nsess * 2 if self.nsess else 64
        cdef Sess* s = <Sess*>realloc(self.sess, n * sizeof(Sess))
        if s == NULL:
            raise MemoryError()
        self.sess = s
        cdef int* f = <int*>realloc(self.free_slots, n * sizeof(int))
        if f == NULL:
            raise MemoryError()
        self.free_slots = f
        cdef int* d = <int*>realloc(self.dirty, n * sizeof(int))
        if d == NULL:
            raise MemoryError()
        self.dirty = d
        memset(&self.sess[self.nsess], 0, (n - self.nsess) * sizeof(Sess))
        cdef int i
        for i in range(n - 1, self.nsess - 1, -1):
            self.free_slots[self.nfree] = i
            self.nfree += 1
        self.nsess = n
        return 0

    cdef int _rehash(self, uint32_t size) except -1:
        cdef int* t = <int*>malloc(size * sizeof(int))
        cdef int i
        cdef uint32_t j
        if t == NULL:
            raise MemoryError()
        memset(t, 0xff, size * sizeof(int))
        for i in range(self.nsess):
            if self.sess[i].used:
                j = self.sess[i].hash & (size - 1)
                while t[j] >= 0:
                    j = (j + 1) & (size - 1)
                t[j] = i
        free(self.table)
        self.table = t
        self.mask = size - 1
        return 0

    cdef inline int _find(self, int lid, SockAddr* a) noexcept nogil:
        cdef uint32_t j = key_hash(lid, a) & self.mask
        cdef int s
        while True:
            s = self.table[j]
            if s < 0:
                return -1
            if same(&self.sess[s], lid, a):
                return s
            j = (j + 1) & self.mask

    def add(self, int lid, str host, int port, sock, unsigned int gen):
        cdef SockAddr a
        cdef int slot
        cdef uint32_t j
        cdef Sess* s
        if lid < 0 or lid >= self.nlisten:
            raise KeyError(lid)
        parse_addr(host, port, &a)
        if self._find(lid, &a) >= 0:
            raise ValueError(f"session {host}:{port} is already registered")
        cdef int fd = PyObject_AsFileDescriptor(sock)
        if self.nfree == 0:
            self._grow_slots()
        if <uint32_t>(self.count + 1) * 2 > self.mask + 1:
            self._rehash((self.mask + 1) * 2)
        self._watch(fd, self.free_slots[self.nfree - 1])
        self.nfree -= 1
        slot = self.free_slots[self.nfree]
        s = &self.sess[slot]
        cdef int listed = s.listed
        memset(s, 0, sizeof(Sess))
        s.listed = listed
        s.used = 1
        s.lid = lid
        s.fd = fd
        s.gen = gen
        s.client = a
        s.clen = sizeof(sockaddr_in6) if a.sa.sa_family == AF_INET6 else sizeof(sockaddr_in)
        s.hash = key_hash(lid, &a)
        j = s.hash & self.mask
        while self.table[j] >= 0:
            j = (j + 1) & self.mask
        self.table[j] = slot
        self.count += 1
        return slot

    cdef Sess* _get(self, int slot) except NULL:
        if slot < 0 or slot >= self.nsess or not self.sess[slot].used:
            raise KeyError(slot)
        return &self.sess[slot]

    def validate(self, int slot, unsigned int gen):
        self._get(slot).gen = gen

    def remove(self, int slot):
        cdef Sess* s = self._get(slot)
        cdef uint32_t i = s.hash & self.mask, j, k
        cdef epoll_event ev
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, s.fd, &ev)  # fails only if it was closed first
        while self.table[i] != slot:
            i = (i + 1) & self.mask
        # Backward-shift deletion keeps every probe chain unbroken without tombstones.
        j = i
        while True:
            j = (j + 1) & self.mask
            if self.table[j] < 0:
                break
            k = self.sess[self.table[j]].hash & self.mask
            if (i <= j and i < k and k <= j) or (i > j and (i < k or k <= j)):
                continue
            self.table[i] = self.table[j]
            i = j
        self.table[i] = -1
        totals = (s.din, s.dout, s.bin, s.bout)
        s.used = 0
        s.dirty = 0
        self.free_slots[self.nfree] = slot
        self.nfree += 1
        self.count -= 1
        return totals

    cdef inline void _touch(self, int slot, Sess* s, double now) noexcept:
        s.last = now
        s.dirty = 1
        if not s.listed:
            s.listed = 1
            self.dirty[self.ndirty] = slot
            self.ndirty += 1

    def run(self, unsigned int gen):
        """One wake-up (udpfast.PyUdpPlane.run)."""
        cdef int n, i
        cdef int64_t which
        slow = []
        refused = []
        answered = []
        errors = []
        memset(self.totals, 0, sizeof(self.totals))
        n = epoll_wait(self.epfd, _events, EVENTS, 0)
        for i in range(n):
            which = <int64_t>_events[i].data.u64
            if which < 0:
                self._forward(<int>(-1 - which), gen, slow, refused)
            elif self._replies(<int>which, errors):
                answered.append(which)
        return (slow, refused, answered, errors, self.totals[0], self.totals[1], self.totals[2],
                self.totals[3], self.totals[4])

    cdef int _forward(self, int lid, unsigned int gen, list slow, list refused) except -1:
        cdef int n, i, j, k, m, r, slot, count, dropped
        cdef int sent = 0, failed = 0
        cdef uint64_t size = 0, b
        cdef Sess* s
        cdef double now
        prepare_rx(BATCH)
        n = recvmmsg(self.lfds[lid], _msgs, BATCH, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0  # nothing after all, or an error: nothing to forward this time
        for i in range(n):
            slot = self._find(lid, &_addrs[i])
            if slot >= 0 and self.sess[slot].gen != gen:
                slot = -1
            _slot_of[i] = slot
        now = monotonic()
        for i in range(n):
            slot = _slot_of[i]
            if slot == -1:
                slow.append((PyBytes_FromStringAndSize(<char*>_iov[i].iov_base, _msgs[i].msg_len),
                             addr_tuple(&_addrs[i]), lid))
                continue
            if slot < 0:  # taken by an earlier group
                continue
            s = &self.sess[slot]
            # This session's datagrams of the batch, in order, in one sendmmsg.
            m = 0
            for j in range(i, n):
                if _slot_of[j] == slot:
                    _giov[m].iov_base = _iov[j].iov_base
                    _giov[m].iov_len = _msgs[j].msg_len
                    _gidx[m] = j
                    _slot_of[j] = -2
                    m += 1
            r = self._send_all(s.fd, _giov, m, NULL, 0, &count, &b, &dropped)
            sent += count
            size += b
            failed += dropped
            s.din += count
            s.bin += b
            if r >= 0:
                # Refused: that one is dropped, and the rest of its datagrams go to the policy,
                # which moves the session (udp.py backend_refused) before it sees them.
                s.gen = 0
                refused.append(slot)
                for j in range(r + 1, m):
                    k = _gidx[j]
                    slow.append((PyBytes_FromStringAndSize(<char*>_giov[j].iov_base,
                                                           _giov[j].iov_len),
                                 addr_tuple(&_addrs[k]), lid))
            if count:
                self._touch(slot, s, now)
        self.totals[0] += sent
        self.totals[1] += size
        self.totals[4] += failed
        return 0

    cdef int _send_all(self, int fd, iovec* iov, int count, void* name, socklen_t namelen,
                       int* sent, uint64_t* size, int* failed) noexcept:
        """Send `count` datagrams (one iovec each) in order, runs of equal size as one UDP GSO
        message, all in one sendmmsg where the socket takes them. A message the socket refuses
        (full, an error) is dropped and the rest still tried. Returns -1, or the index of the
        datagram a connected socket's ECONNREFUSED stopped at (not sent; the rest not tried)."""
        cdef int m = 0, i = 0, k, done = 0, pos = 0, r, q, e
        cdef size_t first, each, total
        cdef uint64_t more
        cdef cmsghdr* cm
        sent[0] = 0
        size[0] = 0
        failed[0] = 0
        while i < count:
            k = 1
            first = total = iov[i].iov_len
            if self.gso and first > 0:
                while i + k < count and k < GSO_SEGMENTS:
                    each = iov[i + k].iov_len
                    if each == 0 or each > first or total + each > GSO_BYTES:
                        break
                    total += each
                    k += 1
                    if each < first:  # only the last of a run may be shorter
                        break
            memset(&_tx[m], 0, sizeof(mmsghdr))
            _tx[m].msg_hdr.msg_name = name
            _tx[m].msg_hdr.msg_namelen = namelen
            _tx[m].msg_hdr.msg_iov = &iov[i]
            _tx[m].msg_hdr.msg_iovlen = k
            if k > 1:
                cm = <cmsghdr*>_cmsg[m]
                cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                cm.cmsg_level = SOL_UDP
                cm.cmsg_type = UDP_SEGMENT
                (<uint16_t*>CMSG_DATA(cm))[0] = <uint16_t>first
                _tx[m].msg_hdr.msg_control = cm
                _tx[m].msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
            _tx_count[m] = k
            _tx_bytes[m] = total
            m += 1
            i += k
        while done < m:
            r = sendmmsg(fd, &_tx[done], m - done, MSG_DONTWAIT)
            if r < 0:
                e = errno
                if e == ECONNREFUSED and name == NULL:
                    return pos
                if _tx_count[done] > 1 and (e == EINVAL or e == EIO or e == EOPNOTSUPP or
                                            e == EMSGSIZE):
                    # No GSO here (an old kernel, a device or path that refuses it): off for
                    # good, and the rest goes one datagram per message.
                    self.gso = False
                    r = self._send_all(fd, &iov[pos], count - pos, name, namelen, &q, &more,
                                       &k)
                    sent[0] += q
                    size[0] += more
                    failed[0] += k
                    return r if r < 0 else pos + r
                failed[0] += _tx_count[done]  # full or another error: dropped
                pos += _tx_count[done]
                done += 1
                continue
            for q in range(done, done + r):
                sent[0] += _tx_count[q]
                size[0] += _tx_bytes[q]
                pos += _tx_count[q]
            done += r
        return -1

    cdef bint _replies(self, int slot, list errors) except -1:
        """A batch of a session's replies to its client; True when they are its first."""
        cdef Sess* s = &self.sess[slot]
        cdef int n, i, sent = 0, failed = 0
        cdef bint first = False
        cdef uint64_t size = 0
        if slot < 0 or slot >= self.nsess or not s.used:
            return False
        prepare_rx(BATCH)
        for i in range(BATCH):
            _msgs[i].msg_hdr.msg_name = NULL
            _msgs[i].msg_hdr.msg_namelen = 0
        n = recvmmsg(s.fd, _msgs, BATCH, MSG_DONTWAIT, NULL)
        if n < 0:
            if errno != EAGAIN and errno != EINTR:
                errors.append((slot, errno))
            return False
        if n == 0:
            return False
        if not s.answered:
            s.answered = 1
            first = True
        for i in range(n):
            _iov[i].iov_len = _msgs[i].msg_len
        self._send_all(self.lfds[s.lid], _iov, n, &s.client, s.clen, &sent, &size, &failed)
        if sent:
            s.dout += sent
            s.bout += size
            self._touch(slot, s, monotonic())
        self.totals[2] += sent
        self.totals[3] += size
        self.totals[4] += failed
        return first

    def touched(self):
        cdef int i, slot
        cdef Sess* s
        out = []
        for i in range(self.ndirty):
            slot = self.dirty[i]
            s = &self.sess[slot]
            s.listed = 0
            if not s.used or not s.dirty:
                continue
            s.dirty = 0
            out.append((slot, s.last, s.din, s.dout, s.bin, s.bout))
            s.din = s.dout = s.bin = s.bout = 0
        self.ndirty = 0
        return out
