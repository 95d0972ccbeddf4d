"""Multi-step scheduling: slot chains across sites, holds, atomic booking, rescheduling."""
