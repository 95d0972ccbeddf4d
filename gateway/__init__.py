"""ATM Gateway: a FHIR R4 gateway and orchestrator for advanced therapy management."""

__version__ = "0.1.0"
