"""The gateway as a client of hospital EHRs: SMART Backend Services to each configured
endpoint, patient intake, referrals that start enrolment, and status written back."""
