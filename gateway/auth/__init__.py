"""Partner access: SMART Backend Services clients, tokens and scopes."""
