"""pika's plain-TCP transport, made to hand the kernel one send() per event-loop turn.

pika (pinned in requirements.txt) buffers every frame a connection emits and sends the buffers
one by one on the socket's next writable event, adding the writer watch for it and removing it
after. A publish is three frames (method, header, body), so each post cost three send()s, two
epoll_ctl calls and a loop iteration in between, and an ack in the same turn one more send().
Here the first write of a turn schedules a flush for the end of the turn, which joins what the
turn wrote and sends it at once; only what the kernel does not take waits for the writable event,
as pika does it. Order is kept: nothing is sent while earlier bytes wait in the buffer.

Relies on pika's transport internals (`_tx_buffers`, `_buffer_tx_data`, `_on_socket_writable`,
`_nbio`, and the module-level name pika instantiates); TLS connections keep pika's own transport.
"""

from __future__ import annotations

from pika.adapters.utils import io_services_utils

_PikaTransport = io_services_utils._AsyncPlaintextTransport


class OneSendPerTurnTransport(_PikaTransport):
    def write(self, data: bytes) -> None:
        if self._state != self._STATE_ACTIVE or not data:
            super().write(data)  # pika's own handling: ignored, or its assertion
            return
        flush_pending = bool(self._tx_buffers)  # a flush is scheduled, or the writer waits
        self._buffer_tx_data(data)
        if not flush_pending:
            self._nbio.call_later(0, self._flush)  # the end of this turn, on any pika loop

    def _flush(self) -> None:
        """Send what this turn wrote as one piece; a remainder waits for the writable event."""
        if self._state != self._STATE_ACTIVE or not self._tx_buffers:
            return
        if len(self._tx_buffers) > 1:
            joined = b"".join(self._tx_buffers)
            self._tx_buffers.clear()
            self._tx_buffers.append(joined)
        # pika's writable handler: sends, aborts the connection on an error, and drops the
        # writer watch once the buffer is empty (a no-op here, none is set).
        self._on_socket_writable()
        if self._state == self._STATE_ACTIVE and self._tx_buffers:
            self._nbio.set_writer(self._sock.fileno(), self._on_socket_writable)


def install() -> None:
    """Make pika build this transport for every plain-TCP connection of the process."""
    io_services_utils._AsyncPlaintextTransport = OneSendPerTurnTransport
