"""A custom reward for the GRPO tests ('grpo_rewards:digits', found on the tests' sys.path): graded, so a
randomly initialised policy's samples already differ in reward and the advantages are not all zero."""


def digits(completion: str, row: dict) -> float:
    """Share of the completion's characters that are digits."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)



def varied_or_flat(completion: str, row: dict) -> float:
    """On rows with an even answer, a value in {0, .25, … 1} from a checksum of the text, so that any
    different completions almost surely differ; 0 on odd ones, so those groups are all equal (no
    signal) whatever the policy writes: what dynamic sampling must drop."""
    import zlib

    return (zlib.crc32(completion.encode()) % 5) / 4 if int(row["answer"]) % 2 == 0 else 0.0
