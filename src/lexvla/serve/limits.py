"""Request guards for the local search server: a body-size limit and a per-request time limit.

The body limit is a plain ASGI middleware, so it refuses an oversized upload from its Content-Length
before any of it is read, and stops a chunked upload as soon as it passes the limit, whatever the
FastAPI version.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")


class BodyTooLarge(HTTPException):
    """Raised while reading a request body that passes the limit (FastAPI re-raises HTTPException)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=_too_large_message(limit))


def _too_large_message(limit: int) -> str:
    return (
        f"the request is larger than the server's limit of {limit / 2**20:.1f} MiB: "
        "upload a smaller image (resize or re-compress it)"
    )


class BodySizeLimit:
    """ASGI middleware: answer 413 (JSON) for request bodies above `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, {"error": _too_large_message(self.max_bytes)})
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

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
