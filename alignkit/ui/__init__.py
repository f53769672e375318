"""`alignkit ui`: the local web dashboard (runs.py: run folders; launch.py: starting runs; server.py: HTTP)."""
