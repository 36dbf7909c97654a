"""How collectives, pipeline schedules and data parallelism work."""
