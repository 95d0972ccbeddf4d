"""The HL7 v2 bridge to a manufacturer's LIMS: ORU^R01 results received over MLLP and
applied through the gateway's own services; OML^O21 manufacturing orders sent over MLLP
until acknowledged. Every message is kept in `hl7_messages` (the database is the queue)."""
