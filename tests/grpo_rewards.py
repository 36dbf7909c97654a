"""A custom reward for the GRPO tests ('grpo_rewards:digits', found on the tests' sys.path): graded, so a
randomly initialised policy's samples already differ in reward and the advantages are not all zero."""


def digits(completion: str, row: dict) -> float:
    """Share of the completion's characters that are digits."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)
