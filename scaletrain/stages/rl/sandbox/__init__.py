"""The python_tests reward's sandbox: bubblewrap processes, a cgroup, and the harness that runs inside them."""
