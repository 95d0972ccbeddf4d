"""Adapters to partners' systems that do not speak FHIR REST to us (an HL7 v2 LIMS)."""
