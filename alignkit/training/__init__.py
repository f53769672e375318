"""Where losses become updates: optimizer and schedule, checkpoints, metrics and progress."""
