"""What every node (peer or seed) runs: the piece server, health and metrics endpoints."""
