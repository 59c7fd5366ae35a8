"""The tc data path's I/O: build the BPF object, load it, attach it to interfaces, write its maps.

A thin adapter over libbpf (Debian's libbpf1, through ctypes: no PyPI dependency) and clang:

- `build_object` compiles `bpf/stateless.c` with `clang -target bpf` into a cache directory, once
  per source text (the object is never shipped: it is built where it runs, at first use);
- `TcProgram` opens and loads the object (the kernel's verifier runs here), attaches the program
  at clsact ingress of the given interfaces (libbpf's `bpf_tc_attach`, netlink), and holds the
  map file descriptors for `write`/`read`/`delete` (BPF_MAP_*_ELEM through libbpf's wrappers);
  `close` detaches the filters (and the clsact qdiscs it created) and frees everything.

The filters are attached with a fixed handle and priority and `BPF_TC_F_REPLACE`, so a program
left behind by a process that died is replaced, not doubled. What the maps hold is tcmaps.py's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("bpf") / "stateless.c"
PROGRAM = "pointsman_stateless"
MAPS = ("vips", "slot_map", "replies", "backend_stats", "listener_stats")
HANDLE = 0x706D  # "pm"
PRIORITY = 0x706D
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1
BPF_ANY = 0
CLANG_TIMEOUT = 120.0


class TcUnavailable(RuntimeError):
    """The tc data path cannot run here (no clang, no libbpf, no BPF); says what is missing."""


def cache_dir() -> Path:
    """Where built objects go: $POINTSMAN_BPF_CACHE, else $XDG_CACHE_HOME/pointsman, else
    ~/.cache/pointsman."""
    explicit = os.environ.get("POINTSMAN_BPF_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pointsman"


def include_dirs() -> list[str]:
    """The multiarch include directory (asm/types.h) the BPF target does not search by itself."""
    machine = os.uname().machine
    triplet = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, "")
    path = Path("/usr/include") / triplet
    return [f"-I{path}"] if triplet and path.is_dir() else []


def missing() -> str | None:
    """Why this host cannot build and load the program (None: it can): what `build_object`
    and the loader would refuse with, for `pointsman check`."""
    try:
        _build_tools()
        _libbpf()
    except TcUnavailable as exc:
        return str(exc)
    return None


def _build_tools() -> str:
    """clang's path, once the tools and headers the build needs are known to be here."""
    clang = shutil.which("clang")
    if clang is None:
        raise TcUnavailable("the tc data path needs clang (Debian: apt-get install clang libbpf-dev)")
    if not Path("/usr/include/bpf/bpf_helpers.h").is_file():
        raise TcUnavailable("the tc data path needs libbpf's headers (Debian: apt-get install libbpf-dev)")
    return clang


def build_object(source: Path = SOURCE, directory: Path | None = None) -> Path:
    """The compiled object of `source`, built now unless a build of the same text is cached."""
    clang = _build_tools()
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join(include_dirs()).encode()).hexdigest()[:16]
    target = (directory or cache_dir()) / f"{source.stem}-{digest}.o"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-Wall", *include_dirs(), "-c",
                           str(source), "-o", str(partial)], capture_output=True, text=True,
                          timeout=CLANG_TIMEOUT, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise TcUnavailable(f"clang could not build {source.name}: {done.stderr.strip()}")
    partial.replace(target)  # atomic: a concurrent build writes the same bytes
    return target


class _TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int), ("attach_point", ctypes.c_int),
                ("parent", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32),
                ("priority", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise TcUnavailable(f"the tc data path needs libbpf (Debian: libbpf1): {exc}") from exc
    voidp, cint = ctypes.c_void_p, ctypes.c_int
    for fn, res, args in (
            ("bpf_object__open_file", voidp, [ctypes.c_char_p, voidp]),
            ("bpf_object__load", cint, [voidp]),
            ("bpf_object__close", None, [voidp]),
            ("bpf_object__find_map_fd_by_name", cint, [voidp, ctypes.c_char_p]),
            ("bpf_object__find_program_by_name", voidp, [voidp, ctypes.c_char_p]),
            ("bpf_program__fd", cint, [voidp]),
            ("bpf_tc_hook_create", cint, [voidp]),
            ("bpf_tc_hook_destroy", cint, [voidp]),
            ("bpf_tc_attach", cint, [voidp, voidp]),
            ("bpf_tc_detach", cint, [voidp, voidp]),
            ("bpf_map_update_elem", cint, [cint, voidp, voidp, ctypes.c_uint64]),
            ("bpf_map_lookup_elem", cint, [cint, voidp, voidp]),
            ("bpf_map_delete_elem", cint, [cint, voidp]),
            ("bpf_map_update_batch", cint, [cint, voidp, voidp, ctypes.POINTER(ctypes.c_uint32), voidp]),
            ("libbpf_num_possible_cpus", cint, [])):
        func = getattr(lib, fn)
        func.restype = res
        func.argtypes = args
    return lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class TcProgram:
    """The loaded program, its maps and the interfaces it is attached to (one owner: the caller)."""

    def __init__(self, obj_path: Path) -> None:
        self._lib = _libbpf()
        self._obj = self._lib.bpf_object__open_file(str(obj_path).encode(), None)
        if not self._obj:
            raise TcUnavailable(f"libbpf cannot open {obj_path}: {os.strerror(ctypes.get_errno())}")
        rc = self._lib.bpf_object__load(self._obj)
        if rc < 0:
            self._lib.bpf_object__close(self._obj)
            raise TcUnavailable(f"the kernel refused the tc program ({os.strerror(-rc)}); needs root "
                                "(CAP_BPF, CAP_NET_ADMIN) and a kernel with BPF")
        prog = self._lib.bpf_object__find_program_by_name(self._obj, PROGRAM.encode())
        self.prog_fd = self._lib.bpf_program__fd(prog)
        self.maps = {name: self._lib.bpf_object__find_map_fd_by_name(self._obj, name.encode())
                     for name in MAPS}
        self.cpus = _check(self._lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")
        self._attached: dict[int, bool] = {}  # ifindex -> whether we created its clsact qdisc

    def attach(self, interface: str) -> None:
        """Attach at clsact ingress of `interface` (creating the qdisc if there is none)."""
        try:
            ifindex = socket.if_nametoindex(interface)
        except OSError as exc:
            raise OSError(errno.ENODEV, f"no interface {interface!r} in this network namespace") from exc
        hook = _TcHook(ctypes.sizeof(_TcHook), ifindex, BPF_TC_INGRESS, 0, 0)
        rc = self._lib.bpf_tc_hook_create(ctypes.byref(hook))
        if rc < 0 and rc != -errno.EEXIST:
            _check(rc, f"clsact qdisc on {interface}")
        opts = _TcOpts(ctypes.sizeof(_TcOpts), self.prog_fd, BPF_TC_F_REPLACE, 0, HANDLE, PRIORITY, 0)
        _check(self._lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)), f"tc filter on {interface}")
        self._attached.setdefault(ifindex, rc != -errno.EEXIST)

    def write(self, name: str, key: bytes, value: bytes) -> None:
        _check(self._lib.bpf_map_update_elem(self.maps[name], key, value, BPF_ANY), f"update {name}")

    def write_many(self, name: str, keys: bytes, values: bytes, count: int) -> None:
        """`count` entries in one system call (BPF_MAP_UPDATE_BATCH): `keys` and `values` are the
        packed keys and values end to end. Each entry is written atomically, not the batch."""
        if count == 0:
            return
        done = ctypes.c_uint32(count)
        _check(self._lib.bpf_map_update_batch(self.maps[name], keys, values, ctypes.byref(done), None),
               f"batch update of {name}")

    def delete(self, name: str, key: bytes) -> None:
        rc = self._lib.bpf_map_delete_elem(self.maps[name], key)
        if rc < 0 and rc != -errno.ENOENT:
            _check(rc, f"delete from {name}")

    def read(self, name: str, key: bytes, size: int) -> bytes | None:
        """A value of `size` bytes (per-CPU maps: every CPU's, 8-byte aligned), None if absent."""
        buffer = ctypes.create_string_buffer(size)
        rc = self._lib.bpf_map_lookup_elem(self.maps[name], key, buffer)
        if rc == -errno.ENOENT:
            return None
        _check(rc, f"lookup in {name}")
        return buffer.raw

    def detach(self, interface: str) -> None:
        """Take the program off `interface` (and the clsact qdisc, if it was created here)."""
        try:
            ifindex = socket.if_nametoindex(interface)
        except OSError:
            return  # gone with its filters
        self._detach(ifindex)

    def _detach(self, ifindex: int) -> None:
        created = self._attached.pop(ifindex, None)
        if created is None:
            return
        hook = _TcHook(ctypes.sizeof(_TcHook), ifindex, BPF_TC_INGRESS, 0, 0)
        opts = _TcOpts(ctypes.sizeof(_TcOpts), 0, 0, 0, HANDLE, PRIORITY, 0)
        self._lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
        if created:
            hook.attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS
            self._lib.bpf_tc_hook_destroy(ctypes.byref(hook))

    def close(self) -> None:
        """Detach from every interface (deleting the clsact qdiscs created here) and free it all."""
        for ifindex in list(self._attached):
            self._detach(ifindex)
        if self._obj:
            self._lib.bpf_object__close(self._obj)
            self._obj = None
