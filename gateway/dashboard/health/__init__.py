"""The operations-health panels of the programme view: custody exceptions and temperature
excursions, slot and quota use per site, and subscription delivery health. Each is one
function returning frozen dataclasses of plain values, read with SQL over the projection
and search-index tables (resource bodies only of the few it lists: the range's safety
Flags, the directory's services), so that the page renders within its budget at
thousands of active journeys.

Visibility follows the partner's role (gateway/auth/policies.py); where it is hard to
decide exactly, a panel shows less rather than more.

One module per panel (custody.py, sites.py, subscribers.py); scope.py holds what they
share: who looks, and a range of days.
"""

from gateway.dashboard.health.custody import (
    CustodyException,
    CustodyExceptions,
    custody_exceptions,
)
from gateway.dashboard.health.scope import Viewer
from gateway.dashboard.health.sites import QuotaUse, SiteUse, slot_use
from gateway.dashboard.health.subscribers import SubscriptionHealth, subscription_health

__all__ = [
    "CustodyException", "CustodyExceptions", "QuotaUse", "SiteUse", "SubscriptionHealth",
    "Viewer", "custody_exceptions", "slot_use", "subscription_health",
]
