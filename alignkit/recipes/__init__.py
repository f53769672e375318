"""Training recipes, one file each: set-up → train loop → checkpoint."""
