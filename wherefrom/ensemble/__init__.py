"""wherefrom.ensemble."""
