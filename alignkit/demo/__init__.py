"""`alignkit demo`: the DPO paper's controlled-sentiment experiment, scaled to a CPU."""
