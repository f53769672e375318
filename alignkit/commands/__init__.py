"""Commands that use a trained model: generate, export, report."""
