"""Throughput and memory profiling: the analytic planner, measured runs, activation accounting."""
