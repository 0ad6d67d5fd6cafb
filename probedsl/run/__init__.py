"""One `probedsl run`: RunOptions checked (options), the session's lifecycle from start to the
last report (session: its states in Session's docstring), --estimate (estimate) and `probedsl
doctor` (doctor). Only the CLI imports this wing.
"""
