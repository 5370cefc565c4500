"""wherefrom.evaluation."""
