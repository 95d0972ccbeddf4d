"""What the HL7 v2 tests share: realistic ORU^R01 messages from a manufacturer's LIMS, a
blocking MLLP client, and a scripted stand-in LIMS that receives orders over MLLP on
127.0.0.1 (closing, refusing or acknowledging as told). Every socket has a timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from mappings import hl7v2

START, END = b"\x0b", b"\x1c\r"
TIMEOUT = 10.0


def oru(coi: str, *obx: str, control_id: str = "LIMS000123") -> str:
    """An ORU^R01 as a LIMS sends it: the code in PID-3 (type COI) and SPM-2."""
    return "\r".join([
        "MSH|^~\\&|MES-LIMS|CELLFAB-NL|ATM-GATEWAY|ATM|20261120101500+0100||ORU^R01^ORU_R01|"
        f"{control_id}|P|2.5.1",
        f"PID|1||{coi}^^^ATM^COI",
        "OBR|1||B2026-0042^MES-LIMS|CART-QC^CAR-T release testing^99ATM|||20261119080000",
        *obx, f"SPM|1|{coi}&ATM||CELLS^Starting material^99ATM"]) + "\r"


QC_RESULTS = (
    "OBX|1|NM|VIAB^Viability CD3+^99ATM||92.5|%^percent^UCUM|>=70|N|||F|||20261119090000",
    "OBX|2|CWE|STERILITY^Sterility^99ATM||NEG^No growth^99ATM||||||F",
    "NTE|1||14-day culture, BacT/ALERT",
    "OBX|3|SN|ENDOTOXIN^Endotoxin^99ATM||<^0.5|EU/mL^^UCUM|<5||||F",
)
RELEASED = ("OBX|4|CWE|BATCH-RELEASE^Batch release^99ATM||RELEASED||||||F|||"
            "20261120100000", "NTE|1||Certified by QP J. Smit")
FAILED = ("OBX|4|CWE|BATCH-RELEASE^Batch release^99ATM||FAILED^Sterility positive||||||F",
          "NTE|1||Gram-positive cocci on day 5")


def framed(text: str) -> bytes:
    return START + text.encode("utf-8") + END


def exchange(port: int, *blocks: bytes) -> list[str]:
    """Send each block on one connection, read the answer to each (segments on lines)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        for block in blocks:
            sock.sendall(block)
            answers.append(_read_block(sock).decode("utf-8"))
    return answers


def _read_block(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(END):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer (got {data!r})")
        data += chunk
    assert data.startswith(START), data
    return data[1:-2]


def ack_of(answer: str) -> hl7v2.Acknowledgement:
    return hl7v2.read_ack(answer)


def wait_for(check: Callable[[], Any], seconds: float = 10.0, what: str = "it") -> Any:
    """Poll `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        time.sleep(0.02)


class FakeLims:
    """An MLLP server on 127.0.0.1 that answers connection n as `script[n]` (the last
    one repeats): `close` (hang up without answering), or an MSA-1 code (AA, AE, AR)."""

    def __init__(self, script: list[str], port: int = 0) -> None:
        self.script = script
        self.received: list[tuple[float, str]] = []  # (monotonic time, message)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(8)
        self._sock.settimeout(0.05)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-lims")

    def __enter__(self) -> FakeLims:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    self._answer(conn)
                except (OSError, ConnectionError):
                    continue

    def _answer(self, conn: socket.socket) -> None:
        message = _read_block(conn).decode("utf-8")
        step = self.script[min(len(self.received), len(self.script) - 1)]
        self.received.append((time.monotonic(), message))
        if step == "close":
            return
        control_id = hl7v2.parse(message)[0].control_id
        text = "" if step == "AA" else "|Product code unknown at this site"
        conn.sendall(framed(
            "MSH|^~\\&|MES-LIMS|CELLFAB-NL|ATM-GATEWAY|ATM|20261120101500+0100||ACK^O21^ACK|"
            f"L{len(self.received)}|P|2.5.1\rMSA|{step}|{control_id}{text}\r"))
