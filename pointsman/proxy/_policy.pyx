# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The TCP policy's per-connection hot path, compiled, for listeners on the compiled engine:
`fold`, fold.py's pass over a batch of ended-connection records, and `admit`, the Flows of the
connections the engine admitted alone (fold.py is the reference of both).

The same steps in the same order, with the records read in place (no tuple and no integers per
record), the histogram buckets found in C arrays, and the flow-log line printed in C (integers and
the six-decimal durations by hand; a duration near a rounding tie takes Python's formatting).
Everything that is not the plain case (a detour: preamble, queue, retries; an end that needs
codes.outcome; a client address or name the fast line cannot print) takes fold.py's own code
for that record or that field, so the two cannot drift apart in what they count.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memchr, memcpy
from libc.math cimport floor

from bisect import bisect_left

from pointsman.proxy.engine._sys cimport Connected, Record

from pointsman.proxy.codes import PLAIN_END, outcome
from pointsman.proxy.engine.api import CONNECTED, POLICY_ERROR, RECORD
from pointsman.proxy.flows import Flow
from pointsman.proxy.fold import END_JSON, REJECT_JSON
from pointsman.telemetry.flow import EndReason, RejectReason
from pointsman.telemetry.flowlog import _QUOTED, client_text, quoted

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL
    bint PyUnicode_IS_ASCII(object unicode)

assert sizeof(Record) == RECORD.size
assert sizeof(Connected) == CONNECTED.size

cdef object _CONNECT_FAILED = EndReason.CONNECT_FAILED
cdef object _INTERNAL = RejectReason.INTERNAL_ERROR
cdef object _END_REASON = EndReason
cdef tuple _PLAIN = PLAIN_END
cdef dict _END_JSON = END_JSON
cdef dict _REJECT_JSON = REJECT_JSON
cdef dict _NAMES = _QUOTED
cdef int _POLICY_ERROR = POLICY_ERROR
cdef enum:
    MAX_BOUNDS = 64


cdef inline Py_ssize_t _bucket(const double* bounds, Py_ssize_t n, double x) noexcept:
    """bisect_left: the first bound >= x (n: past every bound)."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if bounds[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef Py_ssize_t _load(tuple bounds, double* out) except -1:
    cdef Py_ssize_t n = len(bounds), i
    if n > MAX_BOUNDS:
        raise ValueError("too many histogram bounds")
    for i in range(n):
        out[i] = bounds[i]
    return n


cdef inline object _name(object value):
    """The JSON of a name (flowlog.quoted), from its table when there."""
    cdef PyObject* found = PyDict_GetItem(_NAMES, value)
    if found is not NULL:
        return <object>found
    return quoted(value)


cdef inline int _put(char* buf, int n, const char* text, int size) noexcept:
    memcpy(buf + n, text, size)
    return n + size


cdef inline int _digits(char* buf, int n, uint64_t value) noexcept:
    """`value` in decimal at buf + n; returns the new end."""
    cdef char tmp[20]
    cdef int k = 0
    while True:
        tmp[k] = 48 + <char>(value % 10)
        value //= 10
        k += 1
        if value == 0:
            break
    while k:
        k -= 1
        buf[n] = tmp[k]
        n += 1
    return n


cdef int _fixed6(char* buf, int n, double x) noexcept:
    """`x` as Python's f"{x:.6f}" (correctly rounded) at buf + n, or -1 where this short way
    could round differently (near a half-way point, negative, huge): the caller formats it
    the long way."""
    cdef double scaled, whole, rest
    cdef uint64_t micros
    if not (0.0 <= x < 1e5):  # scaled < 2**37: its rounding error is below 2**-16
        return -1
    scaled = x * 1e6  # off the exact product by half an ulp at most (< 1e-5 here)
    whole = floor(scaled)
    rest = scaled - whole
    if 0.4999 < rest < 0.5001:
        return -1  # too close to a half-way point to decide from the rounded product
    micros = <uint64_t>whole + (1 if rest > 0.5 else 0)
    n = _digits(buf, n, micros // 1000000)
    buf[n] = 46  # '.'
    n += 1
    micros %= 1000000
    cdef int i
    for i in range(5, -1, -1):
        buf[n + i] = 48 + <char>(micros % 10)
        micros //= 10
    return n + 6


cdef object _line(str head, object peer, object backend_json, uint64_t bytes_in,
                  uint64_t bytes_out, double duration, bint has_ttfb, double ttfb,
                  object end_json):
    """The rest of the line after `head`, as fold.py writes it."""
    cdef char buf[640]  # the longest line the checks below let through is under 512 bytes
    cdef const char* host_c = NULL
    cdef const char* backend_c
    cdef const char* end_c
    cdef Py_ssize_t host_size = 0, backend_size = 0, end_size = 0
    cdef int n
    cdef bint v6 = False
    cdef long long port = 0
    cdef str host
    cdef str client = None
    if (type(peer) is tuple and len(<tuple>peer) == 2 and type((<tuple>peer)[0]) is str
            and type((<tuple>peer)[1]) is int and PyUnicode_IS_ASCII((<tuple>peer)[0])):
        host = (<tuple>peer)[0]
        port = (<tuple>peer)[1]
        host_c = PyUnicode_AsUTF8AndSize(host, &host_size)
        if host_size > 100:
            client = client_text(peer)
        v6 = memchr(host_c, 58, host_size) != NULL  # ':'
        if not 0 <= port <= 65535:
            client = client_text(peer)
    else:
        client = client_text(peer)
    if client is not None or type(backend_json) is not str or not PyUnicode_IS_ASCII(backend_json) \
            or type(end_json) is not str or not PyUnicode_IS_ASCII(end_json):
        return _slow_line(head, peer, backend_json, bytes_in, bytes_out, duration,
                          ttfb if has_ttfb else None, end_json)
    backend_c = PyUnicode_AsUTF8AndSize(backend_json, &backend_size)
    if backend_size > 200:
        return _slow_line(head, peer, backend_json, bytes_in, bytes_out, duration,
                          ttfb if has_ttfb else None, end_json)
    end_c = PyUnicode_AsUTF8AndSize(end_json, &end_size)
    if end_size > 60:
        return _slow_line(head, peer, backend_json, bytes_in, bytes_out, duration,
                          ttfb if has_ttfb else None, end_json)
    n = 0
    if v6:
        buf[n] = 91  # '['
        n += 1
    memcpy(buf + n, host_c, host_size)
    n += host_size
    if v6:
        buf[n] = 93  # ']'
        n += 1
    buf[n] = 58  # ':'
    n += 1
    n = _digits(buf, n, <uint64_t>port)
    n = _put(buf, n, b'","backend":', 12)
    memcpy(buf + n, backend_c, backend_size)
    n += backend_size
    n = _put(buf, n, b',"bytes_in":', 12)
    n = _digits(buf, n, bytes_in)
    n = _put(buf, n, b',"bytes_out":', 13)
    n = _digits(buf, n, bytes_out)
    n = _put(buf, n, b',"duration":', 12)
    n = _fixed6(buf, n, duration)
    if n < 0:
        return _slow_line(head, peer, backend_json, bytes_in, bytes_out, duration,
                          ttfb if has_ttfb else None, end_json)
    if has_ttfb:
        n = _put(buf, n, b',"ttfb":', 8)
        n = _fixed6(buf, n, ttfb)
        if n < 0:
            return _slow_line(head, peer, backend_json, bytes_in, bytes_out, duration, ttfb,
                              end_json)
    else:
        n = _put(buf, n, b',"ttfb":null', 12)
    n = _put(buf, n, b',"end":', 7)
    memcpy(buf + n, end_c, end_size)
    n += end_size
    buf[n] = 125  # '}'
    buf[n + 1] = 10  # newline
    n += 2
    return head + PyUnicode_DecodeASCII(buf, n, NULL)


cdef object _slow_line(str head, object peer, object backend_json, object bytes_in,
                       object bytes_out, double duration, object ttfb, object end_json):
    return (f'{head}{client_text(peer)}","backend":{backend_json},'
            f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
            f'"duration":{duration:.6f},'
            f'"ttfb":{"null" if ttfb is None else f"{ttfb:.6f}"},'
            f'"end":{end_json}}}\n')


def fold(object listener, bytes records, object head, object lines):
    """fold.fold, compiled: the same arguments, effects and result."""
    cdef double d_bounds[MAX_BOUNDS]
    cdef double t_bounds[MAX_BOUNDS]
    cdef Py_ssize_t d_n, t_n, i, count
    cdef const Record* rec
    cdef double duration, ttfb, d_sum, t_sum
    cdef long d_count = 0, t_count = 0, gone = 0
    cdef bint has_ttfb
    cdef dict connections = listener.connections
    cdef object stats = listener.stats
    cdef object ended = stats.ended
    cdef object rejected = stats.rejected
    cdef object durations = stats.duration
    cdef object ttfbs = stats.ttfb
    cdef list d_counts = durations.counts
    cdef list t_counts = ttfbs.counts
    cdef object admission = listener.admission
    cdef object freed = None
    cdef object flow, detour, how, slot, backend, backend_id, source_key, key, end_json
    cdef PyObject* found
    cdef Py_ssize_t b
    if PyBytes_GET_SIZE(records) % sizeof(Record):
        raise ValueError("a record batch is not a whole number of records")
    count = PyBytes_GET_SIZE(records) // sizeof(Record)
    d_n = _load(durations.bounds, d_bounds)
    t_n = _load(ttfbs.bounds, t_bounds)
    if len(d_counts) != d_n + 1 or len(t_counts) != t_n + 1:
        raise ValueError("histogram counts do not match its bounds")
    d_sum = durations.sum
    t_sum = ttfbs.sum
    rec = <const Record*>PyBytes_AS_STRING(records)
    for i in range(count):
        key = rec[i].conn_id
        found = PyDict_GetItem(connections, key)
        if found is NULL:  # refused at accept: counted then (unless our policy raised)
            if rec[i].detail == _POLICY_ERROR:
                rejected[_INTERNAL] += 1
            continue
        flow = <object>found
        del connections[key]
        gone += 1
        detour = flow.detour
        how = _PLAIN[rec[i].reason] if rec[i].reason < len(_PLAIN) else None
        if detour is not None:
            if detour.preamble is not None:
                listener._preamble_done(rec[i].conn_id, flow)
            if detour.queued:  # its client left (or a cut) while it waited
                detour.queued = False
                listener.left_queue(rec[i].conn_id, flow.pool)
            how = outcome(rec[i].reason, rec[i].detail, detour.backend_failed)
        elif how is None:
            how = outcome(rec[i].reason, rec[i].detail, False)
        duration = <double>(rec[i].ended - rec[i].started) * 1e-9
        if type(how) is _END_REASON:
            end_json = _END_JSON[how]
            ended[how] += 1
            b = _bucket(d_bounds, d_n, duration)
            d_counts[b] = d_counts[b] + 1
            d_sum += duration
            d_count += 1
            if how is _CONNECT_FAILED:
                stats.connect_failed += 1
        else:
            end_json = _REJECT_JSON[how]
            rejected[how] += 1
        has_ttfb = rec[i].first_byte != 0
        ttfb = 0.0
        if has_ttfb:
            ttfb = <double>(rec[i].first_byte - rec[i].started) * 1e-9
            b = _bucket(t_bounds, t_n, ttfb)
            t_counts[b] = t_counts[b] + 1
            t_sum += ttfb
            t_count += 1
        slot = flow.slot
        backend_id = flow.backend_id
        if slot is not None:
            backend = slot.stats
            backend.active -= 1
            if slot.cap:
                if freed is None:
                    freed = set()
                freed.add(flow.pool)
            if backend_id is not None:
                backend.bytes_in += rec[i].bytes_in
                backend.bytes_out += rec[i].bytes_out
        source_key = flow.source_key
        if source_key is not None and admission is not None:
            admission.closed(source_key)
        if lines is not None:
            lines.append(_line(head, flow.peer, _name(backend_id), rec[i].bytes_in,
                               rec[i].bytes_out, duration, has_ttfb, ttfb, end_json))
    durations.sum = d_sum
    durations.count += d_count
    ttfbs.sum = t_sum
    ttfbs.count += t_count
    return gone, freed


def connected(dict connections, bytes entries):
    """fold.connected, compiled: the entries read in place, the same counts and sums."""
    cdef const Connected* entry
    cdef Py_ssize_t i, count, b, n
    cdef PyObject* found
    cdef object flow, slot, backend, histogram, bounds, key
    cdef list h_counts
    cdef double elapsed
    cdef double c_bounds[MAX_BOUNDS]
    cdef object loaded = None  # the bounds tuple in c_bounds (histograms share one, as a rule)
    if PyBytes_GET_SIZE(entries) % sizeof(Connected):
        raise ValueError("a batch of successes is not a whole number of entries")
    count = PyBytes_GET_SIZE(entries) // sizeof(Connected)
    entry = <const Connected*>PyBytes_AS_STRING(entries)
    n = 0
    for i in range(count):
        key = entry[i].conn_id
        found = PyDict_GetItem(connections, key)
        if found is NULL:  # not one of ours (a policy handed entries that are not its own)
            continue
        flow = <object>found
        slot = flow.slot
        if slot is None:
            continue
        flow.backend_id = slot.id
        flow.snapshot = None
        backend = slot.stats
        backend.total += 1
        elapsed = <double>entry[i].elapsed / 1e9
        histogram = backend.connect_time
        bounds = histogram.bounds
        h_counts = histogram.counts
        if bounds is loaded:
            b = _bucket(c_bounds, n, elapsed)
        elif type(bounds) is tuple and len(<tuple>bounds) <= MAX_BOUNDS:
            n = _load(bounds, c_bounds)
            loaded = bounds
            b = _bucket(c_bounds, n, elapsed)
        else:
            b = bisect_left(bounds, elapsed)
        h_counts[b] = h_counts[b] + 1
        histogram.sum += elapsed
        histogram.count += 1


def admit(dict connections, list batch, object pool, object snapshot, dict slots):
    """fold.admit, compiled: the same Flows, in the same order."""
    cdef tuple each
    cdef object flow, slot, stats
    for each in batch:
        flow = Flow((each[3], each[4]), pool, each[2] / 1e9)
        slot = slots[each[1]]
        flow.slot = slot
        flow.snapshot = snapshot
        stats = slot.stats
        stats.active += 1
        connections[each[0]] = flow
