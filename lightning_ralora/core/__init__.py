"""What every layer may use: atomic file writes (io), the bad-input error (errors), secret redaction (secrets) and
the process-wide stop flag (signals). Nothing here imports the rest of the package."""
