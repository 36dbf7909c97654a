"""Load an exported scaletrain model with transformers (offline) and generate from a prompt.

    python examples/hf_generate.py runs/tiny/hf "And God said"
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only: nothing is downloaded


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sys.argv[1]
    prompt = sys.argv[2] if len(sys.argv) > 2 else "And God said"
    tok = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SystemExit(f"export is incomplete: {info}")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"transformers loaded {path} ({sum(p.numel() for p in model.parameters()):,} parameters); greedy continuation:")
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
