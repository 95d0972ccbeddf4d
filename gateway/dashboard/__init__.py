"""The operations dashboard for coordinators and programme managers: who signs in, the
programme view, one patient's journey, and what they may do from it (through the same
FHIR services and rules as every other client)."""
