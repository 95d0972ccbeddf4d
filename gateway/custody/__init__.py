"""Chain of identity and chain of custody: the COI registry, signed custody handoffs
(Provenance), temperature excursions, and the custody report an inspector reads."""
