"""Pipeline parallelism: stage split outside the model, and the 1F1B / interleaved schedules."""
