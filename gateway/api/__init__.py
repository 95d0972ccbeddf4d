"""HTTP: FastAPI routers that turn requests into FHIR interactions and back."""
