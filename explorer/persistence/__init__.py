"""What outlives a session: the history of results and snapshots (zip, strict loader)."""
