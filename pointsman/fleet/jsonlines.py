"""Newline-delimited JSON from a streamed HTTP body (etcd's watch, Kubernetes' watch)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


class StreamEnded(Exception):
    """The stream ended, broke, or sent something that is not one JSON object per line."""


class JsonLines:
    def __init__(self, content: aiohttp.StreamReader, max_bytes: int) -> None:
        self.content = content
        self.max_bytes = max_bytes  # one message larger than this is refused, not buffered
        self._pending = bytearray()

    async def next(self) -> dict[str, Any]:
        while (end := self._pending.find(b"\n")) < 0:
            if len(self._pending) > self.max_bytes:
                raise StreamEnded(f"a message over {self.max_bytes} bytes")
            try:
                chunk = await self.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                raise StreamEnded(f"stream lost: {str(exc) or type(exc).__name__}") from None
            if not chunk:
                raise StreamEnded("stream ended")
            self._pending += chunk
        line = bytes(self._pending[:end])
        del self._pending[: end + 1]
        if not line.strip():
            return await self.next()
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise StreamEnded(f"not JSON: {line[:80]!r}") from None
        if not isinstance(data, dict):
            raise StreamEnded(f"not a JSON object: {line[:80]!r}")
        return data
