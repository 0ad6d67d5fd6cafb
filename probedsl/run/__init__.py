"""One `probedsl run`: RunOptions checked and the scope they choose (options), the session's
lifecycle from start to the last report (session: its states in Session's docstring), what it
does at each report (reporting), --estimate (estimate) and `probedsl doctor` (doctor). Only the
CLI imports this wing.
"""
