"""uvicorn, set up for untrusted clients: a deadline for request headers, a shutdown that ends streams with an
event instead of a cut connection, and one line each for ready, stopping and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tinylm.server")


def timed_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers: a client that opens a connection and
    sends part of a request line (slowloris) is answered 408 and closed after `header_timeout` seconds. (Idle
    keep-alive connections are closed by uvicorn's own keep-alive timeout; bodies by middleware.ReadBody.)"""

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_header_timer()  # the request line and headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next request on this connection gets the same deadline
                self._cancel_header_timer()
                self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _cancel_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            message = f"request headers did not arrive within {header_timeout:g} s".encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(message)).encode()
                                 + b"\r\n\r\n" + message)
            self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_config(app, host: str, port: int, header_timeout: float = 10.0, graceful_timeout: float = 10.0,
                   access_log: bool = True) -> uvicorn.Config:
    _set_up_logging(access_log)
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=timed_protocol(header_timeout),
                          timeout_graceful_shutdown=graceful_timeout, timeout_keep_alive=5)


def _set_up_logging(access_log: bool) -> None:
    """tinylm's own lines (access log, shutdown) on stderr; uvicorn's access log stays off (ours has tokens)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tinylm: %(message)s"))
    for name, on in (("tinylm.access", access_log), ("tinylm.server", True)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO if on else logging.WARNING)
        logger.propagate = False


def make_server(config: uvicorn.Config, ready_message: str, state=None) -> uvicorn.Server:
    """A uvicorn.Server that prints one line once its socket is listening, and on SIGTERM / SIGINT lets running
    requests finish within the grace period, then ends the rest with a final error (app.drain)."""

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(ready_message, file=sys.stderr, flush=True)

        async def shutdown(self, sockets=None):
            grace = self.config.timeout_graceful_shutdown or 0.0
            log.warning("shutting down: new connections refused, running requests get up to %gs to finish", grace)
            if state is not None:
                from tinylm.server.app import drain

                ended = await drain(state, grace)
                if ended:
                    log.warning("ended %d request(s) still running at the end of the grace period with an error "
                                "event (--graceful-timeout)", ended)
                    await asyncio.sleep(0.2)  # let the final events reach their clients
            await super().shutdown(sockets)
            log.warning("stopped")

        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM / SIGINT start a graceful shutdown. uvicorn re-raises the signal once it is done, which
            ends the process as killed; a server that shut down cleanly exits 0 instead."""
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)
