"""Measuring models: sequence KL to a reference, reward statistics and win rates."""
