"""Rewriting a transaction's references once its ids are known.

https://hl7.org/fhir/R4/http.html#trules: `urn:uuid:` (and other fullUrl) references
become the Type/id of the entry they name; conditional references ("Patient?identifier=…")
become their single match. The same fullUrls are replaced where they appear whole in
other elements (uri, canonical, url) and in the narrative's `href` and `src` attributes.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from gateway.errors import FhirError, InvalidError, Issue, MultipleMatchesError
from gateway.services import search
from gateway.services.context import Context
from gateway.services.resources import check_type
from gateway.store.repository import Repository

CONDITIONAL_REFERENCE = re.compile(r"^[A-Z][A-Za-z]+\?")
_NARRATIVE_LINK = re.compile(r'\b(href|src)="([^"]*)"')


class References:
    """Where each reference of a transaction points once its ids are known.

    `by_full_url` maps each entry's fullUrl (and, for one under this server's base, its
    relative form) to the Type/id the entry creates or changes. Conditional references
    are searched once each, however many entries use them.
    """

    def __init__(self, ctx: Context, repo: Repository, by_full_url: dict[str, str]) -> None:
        self.ctx, self.repo = ctx, repo
        self.by_full_url = dict(by_full_url)
        self.resolved: dict[str, str] = {}
        prefix = ctx.base_url + "/"
        for full_url, reference in by_full_url.items():
            if full_url.startswith(prefix):
                self.by_full_url.setdefault(full_url[len(prefix):], reference)

    def rewritten(self, node: Any, root: str) -> Any:
        """A copy of `node` with its references rewritten; an unresolvable one fails with
        its FHIRPath under `root` (e.g. Bundle.entry[2].resource.for.reference)."""
        try:
            return _rewritten(node, self)
        except _AtPath as exc:
            raise exc.located(root) from None

    def link(self, value: str) -> str:
        """A uri-like value or narrative link: the entry's Type/id when the value is one
        of the Bundle's full URLs (never a relative form: free text could equal one)."""
        if value.startswith(("urn:uuid:", "urn:oid:")) or "://" in value:
            return self.by_full_url.get(value, value)
        return value

    def narrative(self, div: str) -> str:
        return _NARRATIVE_LINK.sub(lambda m: f'{m[1]}="{self.link(m[2])}"', div)

    def target(self, ref: str) -> str | None:
        if ref in self.by_full_url:
            return self.by_full_url[ref]
        if CONDITIONAL_REFERENCE.match(ref):
            if ref not in self.resolved:
                self.resolved[ref] = _resolve_conditional(self.ctx, self.repo, ref)
            return self.resolved[ref]
        if ref.startswith(("urn:uuid:", "urn:oid:")):
            raise InvalidError(f"Reference {ref} names no entry of this Bundle")
        return None


def _resolve_conditional(ctx: Context, repo: Repository, ref: str) -> str:
    resource_type, _, criteria = ref.partition("?")
    check_type(resource_type)
    found = search.match_ids(ctx, repo, resource_type,
                             parse_qsl(criteria, keep_blank_values=True), limit=2)
    if len(found) > 1:
        raise MultipleMatchesError(f"Conditional reference {ref} matches several resources")
    if not found:
        raise InvalidError(f"Conditional reference {ref} matches no resource")
    return f"{resource_type}/{found[0]}"


class _AtPath(Exception):  # noqa: N818 - carries a FhirError up to the entry's root
    """A reference that cannot be resolved, and the FHIRPath segments leading to it."""

    def __init__(self, error: FhirError) -> None:
        super().__init__(error.diagnostics)
        self.error, self.segments = error, [".reference"]

    def located(self, root: str) -> FhirError:
        expression = root + "".join(reversed(self.segments))
        self.error.issues = [Issue(i.code, i.diagnostics, i.severity, (expression,))
                             for i in self.error.issues]
        return self.error


def _rewritten(node: Any, refs: References) -> Any:
    """A copy, so the entry's own body stays untouched and a replayed transaction starts
    afresh. Paths are only built on failure (see _AtPath)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            try:
                out[key] = _rewritten(value, refs) if isinstance(value, dict | list) else (
                    _plain(key, value, refs))
            except _AtPath as exc:
                exc.segments.append(f".{key}")
                raise
        ref = out.get("reference")
        if isinstance(ref, str):
            try:
                new = refs.target(ref)
            except FhirError as error:
                raise _AtPath(error) from None
            if new is not None:
                out["reference"] = new
        return out
    if isinstance(node, list):
        items = []
        for n, value in enumerate(node):
            try:
                items.append(_rewritten(value, refs) if isinstance(value, dict | list)
                             else _plain("", value, refs))
            except _AtPath as exc:
                exc.segments.append(f"[{n}]")
                raise
        return items
    return node


# Strings that are never links: `reference` is handled by its parent (it may fail with a
# path), and `value` is an Identifier's or ContactPoint's (an Identifier often records
# the very urn:uuid that is the entry's fullUrl, and must keep it).
_NOT_LINKS = frozenset({"reference", "value", "id"})


def _plain(key: str, value: Any, refs: References) -> Any:
    """A primitive value, with a whole fullUrl replaced (the narrative's links too)."""
    if not isinstance(value, str) or key in _NOT_LINKS:
        return value
    return refs.narrative(value) if key == "div" else refs.link(value)
