"""Lightning callbacks that schedule adapter maths: GID warm-up, SDS switch/refresh, gradient alignment."""
