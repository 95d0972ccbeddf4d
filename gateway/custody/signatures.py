"""Custody signatures: a JWS by each party, over the exact resource versions it vouches for.

What a party signs is a manifest (JSON, canonicalised with RFC 8785):
- `provenance`: the digest of the Provenance being recorded, its signatures left out
  (so that two parties sign the same record independently, in any order);
- `targets`: for each versioned target ("Task/7/_history/3"), the digest of that version;
- `meaning`, `when`, `who`: what the signature says, as written beside it in
  Provenance.signature (21 CFR Part 11 §11.50: printed name, date and time, meaning);
- `client`: the OAuth client whose registered key made it (§11.70: a signature is linked
  to its record and to its signer, and cannot be copied to another record).
A digest is SHA-256 (base64url) of the RFC 8785 form of a resource without `meta`,
narratives and reference displays: what every party sees alike, partners who work by
chain of identity alone included (gateway/auth/redaction.py). Changing a signed version,
or moving a signature to another record, makes verification fail.

`sign` is the signer's side (used by `atm demo`, tests, and anyone scripting a partner);
`verify` the server's, on receipt and on demand.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import rfc8785
from joserfc import jws
from joserfc.errors import JoseError

from gateway.auth.clients import Client
from gateway.auth.credentials import ALGORITHM, Credentials
from gateway.auth.keys import JwksCache
from gateway.auth.redaction import clean
from gateway.auth.tokens import ALGORITHMS, InvalidClientError, client_key

SIG_FORMAT = "application/jose"
MEANING_SYSTEM = "https://atm-gateway.org/fhir/CodeSystem/signature-meaning"
MEANINGS = {"released": "Released custody", "received": "Received custody",
            "verified": "Verified", "witnessed": "Witnessed", "performed": "Performed"}
_LEFT_OUT = ("meta", "text")


def digest(resource: dict[str, Any]) -> str:
    """SHA-256 of the resource's canonical form (see the module's text)."""
    form = {k: v for k, v in clean(resource).items() if k not in _LEFT_OUT}
    if form.get("resourceType") == "Provenance":
        form.pop("signature", None)
        form.pop("id", None)
    raw = hashlib.sha256(rfc8785.dumps(form)).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def manifest(provenance: dict[str, Any], targets: dict[str, dict[str, Any]], meaning: str,
             when: str, who: str, client_id: str) -> dict[str, Any]:
    return {"client": client_id, "meaning": meaning, "when": when, "who": who,
            "provenance": digest(provenance),
            "targets": {ref: digest(resource) for ref, resource in sorted(targets.items())}}


def meaning_of(signature: dict[str, Any]) -> str | None:
    return next((c.get("code") for c in signature.get("type", [])
                 if isinstance(c, dict) and c.get("system") == MEANING_SYSTEM), None)


def sign(credentials: Credentials, provenance: dict[str, Any],
         targets: dict[str, dict[str, Any]], meaning: str, who: dict[str, Any],
         when: str, on_behalf_of: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Provenance.signature by this client over the Provenance (as it will be posted)
    and the target versions (as read from the server), with its meaning."""
    body = rfc8785.dumps(manifest(provenance, targets, meaning, when, who["reference"],
                                  credentials.client_id))
    compact = jws.serialize_compact({"alg": ALGORITHM, "kid": credentials.key.kid}, body,
                                    credentials.key, algorithms=[ALGORITHM])
    signature: dict[str, Any] = {
        "type": [{"system": MEANING_SYSTEM, "code": meaning,
                  "display": MEANINGS.get(meaning, meaning)}],
        "when": when, "who": who, "sigFormat": SIG_FORMAT,
        "data": base64.b64encode(compact.encode()).decode()}
    if on_behalf_of is not None:
        signature["onBehalfOf"] = on_behalf_of
    return signature


@dataclass(frozen=True)
class Check:
    """One signature's verification."""

    valid: bool
    meaning: str | None
    client_id: str | None
    problem: str | None = None


def verify(signature: dict[str, Any], provenance: dict[str, Any],
           targets: dict[str, dict[str, Any] | None],
           find_client: Callable[[str], Client | None], keys: JwksCache) -> Check:
    """Whether the signature is a valid JWS by an enabled client of the organisation it
    names, over exactly this Provenance and these target versions (None: a version that
    cannot be read)."""
    meaning = meaning_of(signature)

    def failed(problem: str, client_id: str | None = None) -> Check:
        return Check(False, meaning, client_id, problem)

    if meaning not in MEANINGS:
        return failed(f"its meaning is not one of {', '.join(MEANINGS)} ({MEANING_SYSTEM})")
    if signature.get("sigFormat") != SIG_FORMAT:
        return failed(f"sigFormat must be {SIG_FORMAT}")
    try:
        compact_text = base64.b64decode(signature.get("data", ""), validate=True).decode()
        compact = jws.extract_compact(compact_text.encode())
        claimed = json.loads(compact.payload)
    except (binascii.Error, UnicodeDecodeError, JoseError, ValueError):
        return failed("its data is not a base64 JWS compact serialisation")
    client_id = claimed.get("client") if isinstance(claimed, dict) else None
    if not isinstance(client_id, str):
        return failed("the signed manifest names no client")
    client = find_client(client_id)
    if client is None or client.disabled:
        return failed(f"client {client_id} is not registered or is disabled", client_id)
    try:
        key = client_key(client, dict(compact.protected), keys)
        jws.deserialize_compact(compact_text, key, algorithms=list(ALGORITHMS))
    except InvalidClientError as exc:
        return failed(f"the signing key: {exc}", client_id)
    except JoseError:
        return failed("the JWS does not verify with the client's registered key", client_id)
    problem = _mismatch(claimed, signature, provenance, targets, client)
    return Check(problem is None, meaning, client_id, problem)


def _mismatch(claimed: dict[str, Any], signature: dict[str, Any], provenance: dict[str, Any],
              targets: dict[str, dict[str, Any] | None], client: Client) -> str | None:
    """What differs between the signed manifest and the record it sits on."""
    who = signature.get("who", {}).get("reference")
    on_behalf = signature.get("onBehalfOf", {}).get("reference")
    if client.organization not in (who, on_behalf):
        return (f"the signing client acts for {client.organization}, which is neither the "
                "signature's who nor its onBehalfOf")
    for field, value in (("meaning", meaning_of(signature)), ("when", signature.get("when")),
                         ("who", who)):
        if claimed.get(field) != value:
            return f"the signed {field} is not the one written beside the signature"
    if claimed.get("provenance") != digest(provenance):
        return "it was made for another record: the Provenance differs from what was signed"
    signed = claimed.get("targets")
    if not isinstance(signed, dict) or set(signed) != set(targets):
        return "it covers other target versions than the record's"
    for reference, resource in sorted(targets.items()):
        if resource is None:
            return f"{reference} cannot be read"
        if signed[reference] != digest(resource):
            return f"{reference} is not the version that was signed: it has changed"
    return None
