"""`state_file`: the runtime changes (`node.overlay`) on disk, so a restart reads them back.

Written as JSON, atomically: a temporary file in the same directory, fsync, rename over the old
one, fsync of the directory; a crash at any moment leaves the old file or the new one, never half
of one. Writes are debounced (`DEBOUNCE` seconds after a change, one write for a burst of
changes) and run in a thread; shutdown writes what is pending. Unlike HAProxy's
server-state-file, which an operator (or a unit's ExecReload) dumps through the runtime API before
a reload, pointsman writes its own file on every change: a crash or a `kill -9` loses at most the
last `DEBOUNCE` seconds.

Reading back at start: a missing file is an empty state. A file that cannot be read or parsed is
logged, renamed aside (`state.json.bad-<unix time>`: nothing is lost, and the next write does not
overwrite it) and the node starts from the config file alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pointsman.config.addresses import resolve
from pointsman.config.model import BackendConfig
from pointsman.node.overlay import Overlay

log = logging.getLogger("pointsman.state")

DEBOUNCE = 0.2  # seconds: a burst of API calls (a deploy script) is one write
MAX_STATE_BYTES = 16 * 1024 * 1024  # thousands of backends fit in well under this


def read_state(path: str | Path) -> tuple[Overlay, str | None]:
    """The overlay in the state file at `path` (empty if there is none), and a problem to log
    (the bad file has then been renamed aside). Blocking: call it in a thread."""
    target = Path(path)
    try:
        with target.open("rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return Overlay(), None
    except OSError as exc:
        return Overlay(), f"cannot read state file {target}: {exc.strerror or exc}; starting " \
                          "from the config file alone"
    try:
        if len(data) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        overlay = Overlay.from_document(json.loads(data))
        _resolve(overlay)
    except (ValueError, UnicodeDecodeError) as exc:
        aside = target.with_name(f"{target.name}.bad-{int(time.time())}")
        try:
            target.rename(aside)
            kept = f"kept as {aside}"
        except OSError as rename_exc:
            kept = f"cannot rename it aside: {rename_exc.strerror}"
        return Overlay(), f"state file {target} is not usable ({exc}); {kept}; starting from " \
                          "the config file alone"
    return overlay, None


def _resolve(overlay: Overlay) -> None:
    """Host names in added or removed entries, resolved as the loader resolves the file's (a
    removed entry compares equal to the file's only with the same resolved address)."""
    def resolved(entry: BackendConfig) -> BackendConfig:
        return entry.model_copy(update={"address": resolve(entry.address)})

    for pool, entries in overlay.added.items():
        overlay.added[pool] = {name: resolved(entry) for name, entry in entries.items()}
    overlay.removed = {key: resolved(entry) for key, entry in overlay.removed.items()}


def write_atomically(path: str | Path, document: dict[str, Any]) -> None:
    """Replace the file at `path` with `document` (JSON) in one rename. Blocking."""
    target = Path(path)
    data = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class StateFile:
    """One state file and its writer (debounced; one write at a time, never from the loop)."""

    def __init__(self, path: str, document: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._document = document
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._again = False
        self.writes = 0
        self.errors = 0
        self.written_at: float | None = None
        self.last_error: str | None = None

    def changed(self) -> None:
        """Something the file holds changed: write within DEBOUNCE seconds."""
        if self._writing is not None:
            self._again = True
        elif self._handle is None:
            self._handle = self._loop.call_later(DEBOUNCE, self._start)

    def _start(self) -> None:
        self._handle = None
        document = {**self._document(), "written_at": time.time()}  # taken on the loop: consistent
        self._writing = self._loop.create_task(self._write(document), name="state-file")

    async def _write(self, document: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(write_atomically, self.path, document)
        except OSError as exc:
            self.errors += 1
            self.last_error = f"{exc.strerror or exc}"
            log.error("cannot write state file %s: %s (runtime changes are kept in memory; "
                      "retried at the next change)", self.path, self.last_error)
        else:
            self.writes += 1
            self.written_at = document["written_at"]
            self.last_error = None
        finally:
            self._writing = None
            if self._again:
                self._again = False
                self.changed()

    async def flush(self) -> None:
        """Write what is pending now and wait for it (shutdown, a state file path that changes)."""
        if self._handle is not None:
            self._handle.cancel()
            self._start()
        while self._writing is not None:
            await asyncio.shield(self._writing)
            if self._handle is not None:  # a change during that write
                self._handle.cancel()
                self._start()

    def statistics(self) -> dict[str, Any]:
        return {"path": self.path, "writes": self.writes, "errors": self.errors,
                "written_at": self.written_at, "last_error": self.last_error}
