"""Request guards for the local search server: body-size limits and a per-request time limit.

The body limits are a plain ASGI middleware, so it refuses an oversized body from its Content-Length
before any of it is read, and stops a chunked one as soon as it passes the limit, whatever the FastAPI
version. Every endpoint has a limit: the upload endpoints the upload limit, all others the (much
smaller) JSON limit.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")


JSON_MAX_BYTES = 256 * 2**10  # a text query or a word list is a few KiB


class BodyTooLarge(HTTPException):
    """Raised while reading a request body that passes the limit (FastAPI re-raises HTTPException)."""

    def __init__(self, message: str) -> None:
        super().__init__(413, detail=message)


def _too_large_message(limit: int, upload: bool) -> str:
    if upload:
        return (
            f"the request is larger than the server's limit of {limit / 2**20:.1f} MiB: "
            "upload a smaller image (resize or re-compress it)"
        )
    return (
        f"the request body is larger than the server's limit of {limit / 2**10:.0f} KiB for this "
        "endpoint: send a shorter text or fewer words"
    )


class BodySizeLimit:
    """ASGI middleware: answer 413 (JSON) for a request body above its limit: `max_bytes` on the
    `upload_paths`, `json_max_bytes` on every other path."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        *,
        json_max_bytes: int = JSON_MAX_BYTES,
        upload_paths: Collection[str] = (),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.json_max_bytes = json_max_bytes
        self.upload_paths = frozenset(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope.get("path") in self.upload_paths
        limit = self.max_bytes if upload else self.json_max_bytes
        message = _too_large_message(limit, upload)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, {"error": message})
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message_in = await receive()
            if message_in["type"] == "http.request":
                received += len(message_in.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(message)
            return message_in

        async def tracking_send(message_out: Message) -> None:
            nonlocal started
            started = started or message_out["type"] == "http.response.start"
            await send(message_out)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as err:  # raised outside FastAPI's own handlers
            if not started:
                await _send_json(send, 413, {"error": err.detail})


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class Worker:
    """Runs blocking model work in a small thread pool, with a time limit per call.

    A call that passes `timeout` seconds answers 504 at once; its thread finishes in the background
    (a forward pass cannot be interrupted), and later calls queue behind it.
    """

    def __init__(self, timeout: float, threads: int = 2) -> None:
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lexvla-serve")

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        future: Awaitable[T] = loop.run_in_executor(
            self.pool, functools.partial(fn, *args, **kwargs)
        )
        return await self.wait(future)

    async def wait(self, future: Awaitable[T]) -> T:
        """`future`'s result, or 504 once it has taken `timeout` seconds."""
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise HTTPException(
                504,
                detail=f"the request took longer than {self.timeout:g} s: try a shorter query or "
                "a smaller image, or start the server with a longer --timeout",
            ) from None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
