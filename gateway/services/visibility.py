"""Which instances exist for the caller: a partner's role limits each type to what
concerns its organisation (gateway/auth/policies.py). Applied in the services every
interaction goes through, so searches, their totals and pages, reads, histories,
conditional interactions, writes and Bundle entries all see the same world."""

from __future__ import annotations

from gateway.auth.policies import instance_criteria
from gateway.errors import ForbiddenError, Issue, NotFoundError
from gateway.services.context import Context
from gateway.store import search_query as sq
from gateway.store.repository import Repository


def criteria(ctx: Context, resource_type: str | None) -> list[tuple[str, str]] | None:
    """The criteria a resource of this type must meet for the caller; None: all do."""
    grant = ctx.grant
    if grant is None or resource_type is None:
        return None
    return instance_criteria(grant.client.role, grant.client.organization, resource_type)


def restrict(ctx: Context, query: sq.SearchQuery) -> None:
    """Add the caller's criteria to a search (not to the links it repeats)."""
    rules = criteria(ctx, query.resource_type)
    if rules:
        extra = sq.parse(query.resource_type, rules, lenient=False, default_count=1,
                         max_count=1)
        query.criteria.extend(extra.criteria)


def visible(ctx: Context, repo: Repository, resource_type: str, resource_id: str) -> bool:
    rules = criteria(ctx, resource_type)
    if rules is None:
        return True
    from gateway.services.search import match_ids  # search uses this module too

    return bool(match_ids(ctx, repo, resource_type, [("_id", resource_id)], limit=1))


def check_visible(ctx: Context, repo: Repository, resource_type: str,
                  resource_id: str, what: str | None = None) -> None:
    """404, worded as for a resource that does not exist, when the caller may not see it."""
    if not visible(ctx, repo, resource_type, resource_id):
        raise NotFoundError(f"{what or f'{resource_type}/{resource_id}'} is not known")


def check_still_visible(ctx: Context, repo: Repository, resource_type: str,
                        resource_id: str) -> None:
    """After a write, in its transaction: a partner may not write what it could not then
    see (another organisation's Task, a Task handed to someone else); the write is
    undone."""
    if not visible(ctx, repo, resource_type, resource_id):
        message = (f"This {resource_type} would not belong to your organisation; "
                   "nothing was written")
        raise ForbiddenError(message, issues=[Issue("forbidden", message)])
