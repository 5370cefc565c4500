"""wherefrom.callbacks."""
