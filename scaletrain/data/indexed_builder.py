"""Writing Megatron .bin/.idx datasets as a stream, without megatron.core.

The bytes are those of megatron.core's `IndexedDatasetBuilder` (one sequence per document): the .bin is
the documents' token ids back to back in the dataset dtype; the .idx is the header `MMIDIDX\\0\\0`, version
1 (u64), the dtype code (u8), the sequence count and the document-index count (u64 each), then the
sequence lengths (int32), their byte offsets into the .bin (int64) and the document indices 0…n (int64).
tests/test_preprocess_stream.py checks the bytes against megatron.core's builder.

Documents are written as they come; only their lengths stay in memory (4 bytes each, as the index needs
them), so memory does not grow with the corpus' tokens. Importing megatron.core (and torch with it) to
write this costs ~450 MB of resident memory, more than the whole streaming preprocessor.
"""

from __future__ import annotations

import struct
from array import array
from itertools import chain

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes (scaletrain.data.indexed reads the same table).
_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
          np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


class IndexedBuilder:
    """Appends documents (token-id lists) to `bin_path`; `finalize(idx_path)` writes the index."""

    def __init__(self, bin_path: str, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"dtype {self.dtype} has no Megatron index code")
        self._bin = open(bin_path, "wb")
        self._lengths = array("i")  # int32, as stored in the .idx
        self.tokens = 0
        self.max_id = 0

    def add_documents(self, docs: list[list[int]]) -> None:
        """Write each of `docs` as one document (empty lists are not documents: the caller skips them)."""
        count = sum(len(d) for d in docs)
        if not count:
            return
        flat = np.fromiter(chain.from_iterable(docs), dtype=self.dtype, count=count)
        self._bin.write(flat.tobytes())
        self._lengths.extend(len(d) for d in docs)
        self.tokens += count
        self.max_id = max(self.max_id, int(flat.max()))

    @property
    def documents(self) -> int:
        return len(self._lengths)

    def close(self) -> None:
        self._bin.close()

    def finalize(self, idx_path: str) -> None:
        """Close the .bin and write the .idx describing it."""
        self.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        n = len(lengths)
        pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _CODES[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.arange(n + 1, dtype=np.int64).tobytes(order="C"))
