"""Redis plumbing: connecting (embedded or external), the embedded server, scripts, error classification."""
