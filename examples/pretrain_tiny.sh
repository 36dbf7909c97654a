#!/usr/bin/env bash
# The embedded CPU default, end to end: tokenizer → Megatron .bin/.idx → tiny Llama pretraining →
# Hugging Face export → transformers loads it and generates.
# Re-running resumes the run in runs/tiny from its latest checkpoint (and only re-exports if it finished).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f data/tokenizer/tokenizer.model ]; then
  scaletrain data tokenizer --input builtin:kjv --vocab-size 2048 --output data/tokenizer
fi
if [ ! -f data/kjv_text_document.idx ]; then
  scaletrain data preprocess --input builtin:kjv --tokenizer data/tokenizer \
    --output-prefix data/kjv_text_document --workers 2
fi
scaletrain train --config configs/tiny.toml "$@"
rm -rf runs/tiny/hf
scaletrain convert to-hf runs/tiny/checkpoints runs/tiny/hf
python examples/hf_generate.py runs/tiny/hf "And God said"
