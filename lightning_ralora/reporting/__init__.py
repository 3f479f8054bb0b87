"""What runs are read into: paper tables, run comparisons, GID profiles, memory plans, the published numbers."""
