"""Fast MinHash signatures: word shingles hashed and permuted in batches with numpy.

datasketch's MinHash.update hashes one shingle at a time (sha1, then every permutation
in a numpy call), which costs milliseconds per document. Here texts are tokenised in
bulk with Arrow, each distinct word is hashed once (blake2b, cached), shingle hashes are
combined from word hashes with vectorised arithmetic, and the permutations run on a
whole block of documents at once as uint32 multiply-xor. The values are stored as
datasketch "affine32" LeanMinHash objects, so datasketch's MinHashLSH (in memory or on
Redis) indexes them unchanged. Everything is seeded and independent of PYTHONHASHSEED.
"""
from __future__ import annotations

import hashlib
import unicodedata
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from datasketch import LeanMinHash

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd constant: combines word hashes into shingle hashes


def canonical(text: str) -> str:
    """Text as Signer compares it: NFKC, lower-cased, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


class _WordHashes(dict):
    """word -> 64-bit blake2b hash, computed on first sight (a C-level map() fills it)."""

    def __missing__(self, word: str) -> int:
        h = self[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return h


class Signer:
    """Computes MinHash signatures for batches of texts; holds the word-hash cache.

    Permutations are h_i(x) = (a_i * x mod 2^32) xor b_i on 32-bit shingle hashes, with odd
    a_i: a bijection per i, computed as one SIMD-friendly uint32 multiply and xor.
    """

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm, self.shingle_size, self.seed = num_perm, shingle_size, seed
        self.a = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
        self.b = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
        self._words = _WordHashes()

    def words(self, texts: list[str]) -> pa.ListArray:
        """Canonical tokens of each text: NFKC, lower-cased, split on whitespace."""
        # Python's NFKC and lower() are faster than Arrow's; Arrow splits faster. NFKC maps
        # Unicode spaces to U+0020, so splitting on ASCII whitespace afterwards is enough.
        # Arrow yields [""] for "" and keeps edge empties, so strip and send empties as null.
        norm = [unicodedata.normalize("NFKC", t).lower().strip() or None for t in texts]
        return pc.ascii_split_whitespace(pa.array(norm, type=pa.large_string()))

    def _word_hashes(self, flat_words: pa.Array) -> np.ndarray:
        # Hash each distinct word once: Arrow's dictionary encoding finds them in C++.
        enc = pc.dictionary_encode(flat_words)
        uniq = enc.dictionary.to_pylist()
        if len(self._words) > 2_000_000:  # bound memory on huge vocabularies
            self._words.clear()
        table = np.fromiter(map(self._words.__getitem__, uniq), dtype=np.uint64, count=len(uniq))
        return table[enc.indices.to_numpy(zero_copy_only=False)]

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        """32-bit hashes of every word k-gram, each text's count of them, and each text's digest.

        A text shorter than k words contributes one shingle of all its words; an empty
        text contributes none. The digest (sha256 of the canonical token sequence) finds
        exact duplicates: texts that differ only in case, Unicode form or spacing.
        """
        lists = self.words(texts)
        offsets = lists.offsets.to_numpy().astype(np.int64)
        lengths = np.diff(offsets)
        w = self._word_hashes(lists.flatten()) if len(lists.flatten()) else np.zeros(0, np.uint64)
        digests = [hashlib.sha256(w[a:b].tobytes()).digest() for a, b in zip(offsets[:-1], offsets[1:])]
        k = self.shingle_size
        n = len(w)
        with np.errstate(over="ignore"):
            h = w.copy()
            for j in range(1, min(k, n)):  # h[i] = mix of w[i .. i+k-1], cut off at the array's end
                h[: n - j] *= _MIX
                h[: n - j] += w[j:]
            h ^= h >> np.uint64(29)  # fold high bits down before keeping 32 of them
            h *= _MIX
        h32 = (h >> np.uint64(32)).astype(np.uint32)
        # A k-gram starting at position p of a text is valid if p + k <= its length; texts
        # shorter than k keep only their first position (the "all words" shingle; the mix of
        # fewer than k words runs over into the next text, so recompute it separately).
        counts = np.where(lengths >= k, lengths - k + 1, np.minimum(lengths, 1))
        starts = np.repeat(offsets[:-1], counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        out = h32[starts] if n else np.zeros(0, np.uint32)
        for t in np.flatnonzero((lengths > 0) & (lengths < k)):
            seg = w[offsets[t] : offsets[t + 1]]
            with np.errstate(over="ignore"):
                v = seg[0]
                for x in seg[1:]:
                    v = v * _MIX + x
                v ^= v >> np.uint64(29)
                v *= _MIX
            out[np.sum(counts[:t])] = np.uint32(int(v) >> 32)
        return out, counts, digests

    def signatures(self, texts: list[str]) -> list[LeanMinHash]:
        """One LeanMinHash per text; a text with no words gets the empty (all-max) signature."""
        from datasketch import LeanMinHash  # here, so signing worker processes skip its import

        return [LeanMinHash(seed=self.seed, hashvalues=row, scheme="affine32") for row in self.signature_matrix(texts)]

    def signature_matrix(self, texts: list[str], batch_shingles: int = 16384) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures."""
        return self.sign(texts, batch_shingles)[0]

    def sign(self, texts: list[str], batch_shingles: int = 16384) -> tuple[np.ndarray, list[bytes]]:
        """(len(texts), num_perm) uint32 signatures and the texts' exact-duplicate digests.

        Shingles are permuted in blocks of about batch_shingles, which keeps the
        (permutations x shingles) block in cache.
        """
        flat, counts, digests = self.shingles(texts)
        sigs = np.full((len(texts), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        ends = np.cumsum(counts)
        i = 0
        while i < len(texts):
            j = int(np.searchsorted(ends, ends[i] - counts[i] + batch_shingles, side="right"))
            j = max(j, i + 1)
            lo = ends[i] - counts[i]
            self._fill(flat[lo : ends[j - 1]], counts[i:j], sigs[i:j])
            i = j
        return sigs, digests

    def _fill(self, flat: np.ndarray, sizes: np.ndarray, out: np.ndarray) -> None:
        nonempty = sizes > 0
        if not nonempty.any():
            return
        # (permutations x shingles), so each row's segment minimum runs over contiguous memory.
        perm = self.a[:, None] * flat[None, :]  # uint32 multiply wraps mod 2^32
        perm ^= self.b[:, None]
        starts = np.concatenate(([0], np.cumsum(sizes[nonempty])[:-1]))
        out[nonempty] = np.minimum.reduceat(perm, starts, axis=1).T


_signers: dict[tuple[int, int, int], Signer] = {}


def sign_chunk(texts: list[str], params: tuple[int, int, int]) -> tuple[np.ndarray, list[bytes]]:
    """Worker-process entry point: sign texts with this process's Signer(num_perm, shingle_size, seed).

    The Signer is kept between chunks so its word-hash cache stays warm.
    """
    if params not in _signers:
        _signers[params] = Signer(*params)
    return _signers[params].sign(texts)
