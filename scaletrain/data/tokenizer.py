"""Tokenizers: train a SentencePiece BPE, or load `tokenizer.model` / `tokenizer.json`.

A trained tokenizer directory holds `tokenizer.model` plus `tokenizer_config.json` and
`special_tokens_map.json`, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it and
produces the same ids (SentencePiece is trained with the identity normaliser and without
whitespace folding, the settings under which transformers' conversion agrees).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# End-of-text tokens of common tokenizer.json vocabularies, in order of preference.
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>", "<|eot_id|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


class Tokenizer:
    """The interface the data pipeline uses: ids in, ids out, plus the special ids."""

    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    unk_id: int | None = None
    threads: int | None = None  # encode_batch's threads (None: the library's default, every core)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        """The id of a token spelled exactly `token` (None: the vocabulary has no such token)."""
        raise NotImplementedError

    def encode_with_specials(self, text: str, specials: Iterable[str]) -> list[int]:
        """Ids of `text` in which each of `specials` (tokens of the vocabulary) stands for its own id, as
        transformers encodes a rendered chat: the text between them is encoded piece by piece."""
        tokens = sorted({t for t in specials if t}, key=len, reverse=True)
        if not tokens:
            return self.encode(text)
        ids: list[int] = []
        for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, tokens)) + ")", text)):
            if i % 2:
                ids.append(self.token_id(piece))  # type: ignore[arg-type]
            elif piece:
                ids += self.encode(piece)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the tokenizer file: which tokenizer wrote a dataset."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a readable SentencePiece model ({_reason(e)}); it is truncated or "
                             "corrupt — copy it again or re-train it with `scaletrain data tokenizer`.") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise ValueError(f"{path}: the SentencePiece model has no end-of-sequence token (eos_id < 0).")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def token_id(self, token: str) -> int | None:
        tid = self.sp.piece_to_id(token)
        return tid if self.sp.id_to_piece(tid) == token else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=self.threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (special tokens read from tokenizer_config.json if present)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self.path = path
        try:
            self.tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise ValueError(f"{path} is not a readable tokenizer.json ({_reason(e)}); it is truncated or corrupt "
                             "— copy it again.") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        named = self._configured_specials(path.parent)
        self.eos_id = self._find(named.get("eos_token"), _EOS_CANDIDATES, path, required=True)  # type: ignore[assignment]
        self.bos_id = self._find(named.get("bos_token"), _BOS_CANDIDATES, path, required=False)
        self.pad_id = self._find(named.get("pad_token"), (), path, required=False)
        self.unk_id = self._find(named.get("unk_token"), (), path, required=False)

    @staticmethod
    def _configured_specials(folder: Path) -> dict[str, str]:
        cfg = folder / "tokenizer_config.json"
        if not cfg.is_file():
            return {}
        data = json.loads(cfg.read_text())
        out = {}
        for key in ("eos_token", "bos_token", "pad_token", "unk_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
        return out

    def _find(self, configured: str | None, candidates: tuple[str, ...], path: Path, required: bool) -> int | None:
        for token in ((configured,) if configured else ()) + candidates:
            tid = self.tok.token_to_id(token)
            if tid is not None:
                return tid
        if required:
            raise ValueError(f"{path}: cannot find an end-of-text token (tried {', '.join(candidates)}); "
                             "add eos_token to tokenizer_config.json beside it.")
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode_with_specials(self, text: str, specials: Iterable[str]) -> list[int]:
        return self.encode(text)  # the tokenizer splits out its added (special) tokens itself

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The same ids as encode_batch, without computing character offsets. Threads: the process's
        # rayon pool (RAYON_NUM_THREADS at its first batch), not `threads`.
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def _reason(e: BaseException) -> str:
    """SentencePiece's messages start with its source location ('INTERNAL: src/x.cc(78) [check] reason')."""
    text = str(e).strip()
    if "sentences_.empty()" in text:
        return "the input holds no text"
    return text.split("] ", 1)[1].strip() if "] " in text else text


def resolve_tokenizer_file(path: str | Path) -> Path:
    """A tokenizer directory or file → the file to load; clear error when there is none."""
    p = Path(path)
    if p.is_dir():
        for name in TOKENIZER_FILES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p} holds neither tokenizer.model nor tokenizer.json; "
                                "train one with `scaletrain data tokenizer` or point data.tokenizer at one.")
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer {p} does not exist; train one with `scaletrain data tokenizer`.")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.model` (SentencePiece) or `tokenizer.json` (HF tokenizers), or a folder with one."""
    f = resolve_tokenizer_file(path)
    if f.suffix == ".json":
        return HFTokenizer(f)
    return SentencePieceTokenizer(f)


def _lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """SentencePiece trains on 'sentences': feed lines, long ones cut, so nothing is silently skipped."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            for i in range(0, len(line), max_chars):
                yield line[i : i + max_chars]


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int, *,
                        max_sentences: int = 2_000_000, threads: int = 1) -> Path:
    """Train a byte-fallback BPE on `texts` and write a transformers-loadable tokenizer folder."""
    import sentencepiece as spm

    if vocab_size < 1:
        raise ValueError(f"--vocab-size {vocab_size} must be positive (e.g. 4096: the 256 byte pieces, the "
                         "corpus' characters and the merges).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts, 4096),
            model_prefix=str(out / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            character_coverage=1.0,
            # identity, no whitespace folding, no dummy prefix: transformers' Llama conversion
            # (with add_prefix_space=False) then gives identical ids, leading spaces included.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # SentencePiece's own checks, e.g. fewer pieces than the characters seen
        raise ValueError(f"--vocab-size {vocab_size}: SentencePiece cannot train this vocabulary on the input "
                         f"({_reason(e)}); choose another --vocab-size.") from None
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        "add_prefix_space": False,
        "model_max_length": 1_000_000,
        **specials,
    }, indent=2))
    return out / "tokenizer.model"
