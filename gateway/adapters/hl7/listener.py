"""The MLLP listener: messages from the LIMS in, one answer each, one at a time per
connection (python-hl7's asyncio MLLP server). Every block received is stored before it
is answered, even one that is not HL7 at all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from hl7.mllp import start_hl7_server

from gateway.adapters.hl7 import inbound
from gateway.settings import Settings
from gateway.store.database import Database
from mappings.hl7v2_fields import SEGMENT_SEQUENCE, Hl7ParseError, Where

log = logging.getLogger("atm.hl7")
START, END = b"\x0b", b"\x1c\r"  # MLLP: <VT> message <FS><CR>
_BETWEEN_BLOCKS = b"\r\n\t "  # what some senders leave between blocks


async def start(db: Database, settings: Settings, host: str, port: int) -> asyncio.Server:
    """Listen on host:port. Several `atm serve` workers share the port (SO_REUSEPORT):
    whichever takes a message stores and answers it."""
    async def on_client(reader: asyncio.StreamReader, writer: Any) -> None:
        await _serve_client(db, settings, reader, writer)

    server: asyncio.Server = await start_hl7_server(
        on_client, host, port, limit=settings.hl7_max_message_bytes, reuse_port=True)
    return server


async def _serve_client(db: Database, settings: Settings, reader: asyncio.StreamReader,
                        writer: Any) -> None:
    peer = writer.get_extra_info("peername")
    try:
        while (block := await _read_block(db, settings, reader, peer)) is not None:
            answer = await asyncio.to_thread(_answer, db, settings, block)
            if answer is None:
                break  # not stored: no answer, and the sender sends it again
            writer.writeblock(answer.encode("utf-8"))
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
        log.warning("MLLP connection from %s dropped: %s", peer, exc)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read_block(db: Database, settings: Settings, reader: asyncio.StreamReader,
                      peer: Any) -> bytes | None:
    """The next block, with its <VT> (checked by `_answer`); None once the peer closes.
    A block cut off by the close is kept all the same (as failed: nobody to answer)."""
    try:
        return (await reader.readuntil(END))[:-len(END)].lstrip(_BETWEEN_BLOCKS)
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip(_BETWEEN_BLOCKS):
            log.warning("MLLP connection from %s closed inside a block: kept as failed", peer)
            await asyncio.to_thread(inbound.refuse, db, settings, _decode(exc.partial),
                                    Hl7ParseError("the connection closed before the end "
                                                  "of the MLLP block", Where("MSH")))
        return None


def _answer(db: Database, settings: Settings, block: bytes) -> str | None:
    """The ACK for one block; None when it could not even be stored."""
    try:
        if not block.startswith(START):
            return inbound.refuse(db, settings, _decode(block), Hl7ParseError(
                "the MLLP block does not begin with <VT> (0x0B)", Where("MSH"),
                SEGMENT_SEQUENCE))
        return inbound.receive(db, settings, _decode(block[len(START):]))
    except Exception:  # noqa: BLE001 - the database is away: the sender must resend
        log.exception("an HL7 message could not be stored or settled; it is not answered")
        return None


def _decode(data: bytes) -> str:
    """UTF-8 (what our messages declare), else ISO 8859-1, which every byte string is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
