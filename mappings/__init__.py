"""Pure translations between formats (no I/O, no database)."""
