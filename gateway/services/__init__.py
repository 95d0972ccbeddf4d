"""FHIR semantics, transport-agnostic: interactions take a FhirRequest, give a FhirResponse.

The HTTP routers and the batch/transaction processor both call these, so a Bundle entry
behaves exactly like the same request sent alone.
"""
