"""The audit trail: an AuditEvent (IHE BALP) for every request, hash-chained."""
