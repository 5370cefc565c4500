"""wherefrom.attribution."""
