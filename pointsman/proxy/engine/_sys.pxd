# The Linux calls the compiled engine makes: epoll, sockets, splice, pipes, recvmmsg/sendmmsg.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        EINPROGRESS
        ETIMEDOUT
        EIO
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM
        EADDRNOTAVAIL
        EADDRINUSE
        EINVAL


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int, timespec*)
    enum:
        CLOCK_MONOTONIC


cdef extern from "<unistd.h>" nogil:
    int close(int)
    int pipe2(int*, int)
    ssize_t read(int, void*, size_t)
    ssize_t write(int, const void*, size_t)


cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int, void*, int, void*, size_t, unsigned int)
    int fcntl(int, int, ...)
    enum:
        O_NONBLOCK
        O_CLOEXEC
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETPIPE_SZ


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int, unsigned long, ...)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct linger:
        int l_onoff
        int l_linger
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int socket(int, int, int)
    int accept4(int, sockaddr*, socklen_t*, int)
    int bind(int, const sockaddr*, socklen_t)
    int connect(int, const sockaddr*, socklen_t)
    ssize_t recv(int, void*, size_t, int)
    ssize_t send(int, const void*, size_t, int)
    int shutdown(int, int)
    int setsockopt(int, int, int, const void*, socklen_t)
    int getsockopt(int, int, int, void*, socklen_t*)
    int getsockname(int, sockaddr*, socklen_t*)
    int recvmmsg(int, mmsghdr*, unsigned int, int, timespec*)
    int sendmmsg(int, mmsghdr*, unsigned int, int)
    enum:
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_ERROR
        SO_KEEPALIVE
        SO_LINGER
        SHUT_WR
        MSG_NOSIGNAL
        MSG_MORE
        MSG_DONTWAIT
        MSG_TRUNC


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    enum:
        IPPROTO_TCP
        SOL_IP
    unsigned short htons(unsigned short)
    unsigned short ntohs(unsigned short)
    uint32_t ntohl(uint32_t)


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY
        TCP_KEEPIDLE
        TCP_KEEPINTVL
        TCP_KEEPCNT


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int, const char*, void*)
    const char* inet_ntop(int, const void*, char*, socklen_t)


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int)
    int epoll_ctl(int, int, int, epoll_event*)
    int epoll_wait(int, epoll_event*, int, int)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLRDHUP
        EPOLLET
        EPOLLERR
        EPOLLHUP
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD


# A socket address big enough for IPv6 (sockaddr_in6 is 28 bytes); sockaddr_storage is 128.
cdef union SockAddr:
    sockaddr sa
    sockaddr_in v4
    sockaddr_in6 v6


# One ended connection as the engine hands it to the policy (api.RECORD, field for field): the
# engine writes it, proxy/_policy.pyx reads it in place.
cdef packed struct Record:
    uint64_t conn_id
    int backend
    uint8_t reason
    uint8_t flags
    uint16_t detail
    uint64_t bytes_in
    uint64_t bytes_out
    int64_t started
    int64_t connected
    int64_t first_byte
    int64_t ended
    int64_t listener
    int64_t attempt


# One quiet connect success as the engine hands it to the policy (api.CONNECTED, field for
# field): conn_id, the target's backend id, elapsed ns (connected - attempt).
cdef packed struct Connected:
    uint64_t conn_id
    int64_t backend
    int64_t elapsed


cdef inline int parse_addr(str host, int port, SockAddr* out) except -1:
    """A numeric IPv4 or IPv6 address and a port into `out` (both engines' targets, the UDP
    plane's sessions)."""
    cdef bytes raw = host.encode("ascii")
    memset(out, 0, sizeof(SockAddr))
    if b":" in raw:
        out.v6.sin6_family = AF_INET6
        out.v6.sin6_port = htons(<unsigned short>port)
        if inet_pton(AF_INET6, raw, &out.v6.sin6_addr) != 1:
            raise ValueError(f"not a numeric IPv6 address: {host!r}")
    else:
        out.v4.sin_family = AF_INET
        out.v4.sin_port = htons(<unsigned short>port)
        if inet_pton(AF_INET, raw, &out.v4.sin_addr) != 1:
            raise ValueError(f"not a numeric IPv4 address: {host!r}")
    return 0


cdef inline void fill_rx(mmsghdr* msgs, iovec* iov, SockAddr* addrs, char* buf, size_t stride,
                         size_t size, int count) noexcept nogil:
    """Point `count` messages at consecutive `size`-byte slots of `buf` (`stride` apart) and at
    their own source address, ready for recvmmsg (the engine's batch read, the UDP plane)."""
    cdef int i
    for i in range(count):
        iov[i].iov_base = buf + <size_t>i * stride
        iov[i].iov_len = size
        memset(&msgs[i], 0, sizeof(mmsghdr))
        msgs[i].msg_hdr.msg_name = &addrs[i]
        msgs[i].msg_hdr.msg_namelen = sizeof(SockAddr)
        msgs[i].msg_hdr.msg_iov = &iov[i]
        msgs[i].msg_hdr.msg_iovlen = 1


cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char*, int)
    void* dlsym(void*, const char*)
    enum:
        RTLD_NOW
        RTLD_NOLOAD


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int, int)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
