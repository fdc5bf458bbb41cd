"""The library index of `--mode search`: what each video file of a library holds, and the
embeddings of its contents, kept across searches.

One index per model and reading setting: `WORKDIR/search_library/<key>/` (the key hashes
the checkpoint, the model config, the frames read, the image size and the token storage;
`search_cache.library_description`), never the file list, so a library can change under
it. It holds:

- `index.sqlite`, three tables:
  - `files` (root, relpath, size, mtime_ns, hash): the files of each library root seen,
    by path relative to the root. Only a file whose size or modification time changed,
    or a new one, is hashed again (`content_hash`); a touched file whose bytes did not
    change keeps its hash, so is not embedded again.
  - `videos` (hash, chunk, row, error): the embedded contents, by content hash: the row
    of its stage-1 vector in a chunk, or the error that made it unreadable (so a broken
    file is not retried on every search, only once its contents change). Content
    addressing makes a renamed or moved file, or a copy, cost nothing, and two library
    roots searched with one model share the embeddings.
  - `chunks` (id, count): the chunk files committed.
- `chunks/<id>.mean.npy`: float32 [n, E], the mean over frames of each video's
  L2-normalised frame embeddings. The stage-1 score is the mean over frames of the
  per-frame cosines, which by linearity is the dot product of the query with that mean
  (`models.t2v2t.similarity` computes it so), so this one vector keeps the score exact;
  float32 because it costs 4E bytes a video (512 B at E = 128, 1 KiB at 256) and float16
  moved scores by up to 8e-5 on the benchmark's index, which reordered the top 16 of 16
  of 20 random queries there (near ties).
- `chunks/<id>.tokens.npy` (token storage 'float16' only): float16 [n, T, N, D], the
  video tokens the matching head reranks with (the encoder hands them over in float16).

A chunk is committed by writing its arrays under temporary names, renaming them into
place, then one SQLite transaction that records the chunk and its videos: a chunk is
either in the index whole or not at all, and a search that stops (Ctrl-C, a crash, a
kill) loses only the chunk it was embedding. Chunk files that no transaction records
(written just before a crash) are deleted when the index is next opened for writing, if
they are older than `ORPHAN_AGE_S` (younger ones may belong to a search running beside
this one). The embeddings of removed or replaced files stay in the index (a file that
comes back costs nothing); delete the key's folder to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import time
import uuid

import numpy as np

LIBRARY_VERSION = 1
# Bytes hashed at the start, the middle and the end of a file larger than three of them.
HASH_BLOCK = 1 << 20
ORPHAN_AGE_S = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
  root TEXT NOT NULL, relpath TEXT NOT NULL, size INTEGER NOT NULL,
  mtime_ns INTEGER NOT NULL, hash TEXT NOT NULL, PRIMARY KEY (root, relpath));
CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, count INTEGER NOT NULL,
  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS videos (hash TEXT PRIMARY KEY, chunk TEXT, row INTEGER,
  error TEXT);
"""


def content_hash(path: str, size: int | None = None) -> str:
  """A hash of the file's size and bytes: all of them up to 3 MiB, else the first, middle
  and last MiB.

  Why not every byte: hashing is done for every new or changed file, and a library of
  large videos would be read in full once more before any embedding (about 1 s per GB).
  A video container changes its header or index (first or last MiB) with any re-encode
  or edit, and the size almost always; a same-size change confined to unsampled middle
  bytes would keep its old embedding. benchmarks/search_library.py measures both."""
  if size is None:
    size = os.stat(path).st_size
  h = hashlib.blake2b(digest_size=16)
  h.update(str(size).encode())
  with open(path, "rb") as f:
    if size <= 3 * HASH_BLOCK:
      h.update(f.read())
    else:
      for offset in (0, (size - HASH_BLOCK) // 2, size - HASH_BLOCK):
        f.seek(offset)
        h.update(f.read(HASH_BLOCK))
  return h.hexdigest()


def full_hash(path: str) -> str:
  """Every byte (the benchmark's comparison for `content_hash`)."""
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


@dataclasses.dataclass
class Plan:
  """A library listing checked against the index."""
  paths: list[str]                 # absolute, in listing order
  hashes: list[str | None]         # content hash of each path (None: could not be read)
  todo: list[int]                  # indices into paths to embed: one per new content hash
  hash_errors: dict[str, str]      # path -> why it could not be opened
  hashed: int = 0                  # files hashed this time (new or changed size / mtime)
  removed: int = 0                 # files of this root the index knew that are gone


class ChunkTokens:
  """The stored video tokens of a list of videos, read from the chunks' memory maps:
  `tokens[ids]` -> float16 [len(ids), T, N, D] (what `score_candidates` indexes)."""

  def __init__(self, folder: str, where: list[tuple[str, int] | None]):
    self.folder, self.where = folder, where
    self._maps: dict[str, np.ndarray] = {}

  def __len__(self):
    return len(self.where)

  def _map(self, chunk: str) -> np.ndarray:
    if chunk not in self._maps:
      self._maps[chunk] = np.load(os.path.join(self.folder, "chunks", f"{chunk}.tokens.npy"),
                                  mmap_mode="r")
    return self._maps[chunk]

  def __getitem__(self, ids) -> np.ndarray:
    ids = np.atleast_1d(np.asarray(ids))
    rows = []
    for i in ids.tolist():
      loc = self.where[i]
      if loc is None:
        raise KeyError(f"video {i} has no stored tokens (it could not be read)")
      rows.append(self._map(loc[0])[loc[1]])
    return np.stack(rows)


class LibraryIndex:
  """One index folder (module docstring). `writer=False` (the processes other than 0 of
  a multi-host search) reads it and never writes."""

  def __init__(self, folder: str, description: dict, *, writer: bool = True):
    self.folder, self.writer = folder, writer
    os.makedirs(os.path.join(folder, "chunks"), exist_ok=True)
    # A long timeout: another search may hold the write lock while it commits a chunk.
    self.db = sqlite3.connect(os.path.join(folder, "index.sqlite"), timeout=120.0)
    if writer:
      with self.db:
        self.db.executescript(_SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('description', ?)",
                        (json.dumps(description, sort_keys=True, default=str),))
      self._remove_orphans()

  def close(self) -> None:
    self.db.close()

  def _remove_orphans(self) -> None:
    known = {row[0] for row in self.db.execute("SELECT id FROM chunks")}
    now = time.time()
    chunk_dir = os.path.join(self.folder, "chunks")
    for name in os.listdir(chunk_dir):
      chunk = name.split(".", 1)[0]
      path = os.path.join(chunk_dir, name)
      if chunk in known:
        continue
      try:
        if now - os.stat(path).st_mtime > ORPHAN_AGE_S:
          os.remove(path)
      except OSError:
        pass

  # -- the listing ----------------------------------------------------------------------
  def plan(self, root: str, paths: list[str]) -> Plan:
    """Hashes of `paths` (files under `root`), from the `files` table where their size
    and modification time are unchanged; the `files` table updated (new, changed and
    removed files of `root`); the contents still to embed."""
    root = os.path.abspath(root)
    known = {rel: (size, mtime, h) for rel, size, mtime, h in self.db.execute(
        "SELECT relpath, size, mtime_ns, hash FROM files WHERE root = ?", (root,))}
    hashes: list[str | None] = []
    errors: dict[str, str] = {}
    updates, seen = [], set()
    hashed = 0
    for path in paths:
      rel = os.path.relpath(path, root)
      seen.add(rel)
      try:
        st = os.stat(path)
        old = known.get(rel)
        if old is not None and old[0] == st.st_size and old[1] == st.st_mtime_ns:
          hashes.append(old[2])
          continue
        h = content_hash(path, st.st_size)
        hashed += 1
      except OSError as e:
        errors[path] = f"{type(e).__name__}: {e}"
        hashes.append(None)
        continue
      hashes.append(h)
      updates.append((root, rel, st.st_size, st.st_mtime_ns, h))
    gone = [(root, rel) for rel in known if rel not in seen]
    if self.writer and (updates or gone):
      with self.db:
        self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", updates)
        self.db.executemany("DELETE FROM files WHERE root = ? AND relpath = ?", gone)
    indexed = self._indexed_hashes()
    todo, planned = [], set()
    for i, h in enumerate(hashes):
      if h is not None and h not in indexed and h not in planned:
        todo.append(i)
        planned.add(h)
    return Plan(paths=list(paths), hashes=hashes, todo=todo, hash_errors=errors,
                hashed=hashed, removed=len(gone))

  def _indexed_hashes(self) -> set[str]:
    return {row[0] for row in self.db.execute("SELECT hash FROM videos")}

  # -- embedding ------------------------------------------------------------------------
  def commit_chunk(self, hashes: list[str], means: np.ndarray, tokens: np.ndarray | None,
                   errors: dict[str, str]) -> str | None:
    """Adds a chunk: `hashes[i]` has stage-1 vector `means[i]` (and `tokens[i]`); the
    contents in `errors` {hash: why} could not be read. Atomic (module docstring)."""
    if not self.writer or (not hashes and not errors):
      return None
    chunk = uuid.uuid4().hex[:16]
    chunk_dir = os.path.join(self.folder, "chunks")
    arrays = {"mean": np.ascontiguousarray(means, np.float32)}
    if tokens is not None:
      arrays["tokens"] = np.ascontiguousarray(tokens, np.float16)
    for name, array in arrays.items():
      final = os.path.join(chunk_dir, f"{chunk}.{name}.npy")
      tmp = final + ".tmp"
      with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())  # the data on disk before the transaction that names it
      os.replace(tmp, final)
    rows = [(h, chunk, i, None) for i, h in enumerate(hashes)]
    rows += [(h, None, None, e) for h, e in errors.items()]
    with self.db:
      self.db.execute("INSERT INTO chunks VALUES (?, ?, ?)", (chunk, len(hashes), time.time()))
      self.db.executemany("INSERT OR REPLACE INTO videos VALUES (?, ?, ?, ?)", rows)
    return chunk

  # -- reading --------------------------------------------------------------------------
  def load(self, hashes: list[str | None], *, tokens: bool
           ) -> tuple[np.ndarray, ChunkTokens | None, dict[int, str], int]:
    """(stage-1 vectors float32 [len(hashes), E] (zeros where there is none), the tokens
    (`tokens`: stored ones, else None), {position: error} of the contents known to be
    unreadable, and how many hashes the index does not hold)."""
    where: dict[str, tuple[str, int] | None] = {}
    errors_by_hash: dict[str, str] = {}
    for h, chunk, row, error in self.db.execute("SELECT hash, chunk, row, error FROM videos"):
      if chunk is None:
        errors_by_hash[h] = error or "unreadable"
      else:
        where[h] = (chunk, int(row))
    means_of: dict[str, np.ndarray] = {}
    locs: list[tuple[str, int] | None] = []
    errors: dict[int, str] = {}
    missing = 0
    for i, h in enumerate(hashes):
      loc = where.get(h) if h is not None else None
      locs.append(loc)
      if loc is None:
        if h is not None and h in errors_by_hash:
          errors[i] = errors_by_hash[h]
        elif h is not None:
          missing += 1
        continue
      if loc[0] not in means_of:
        means_of[loc[0]] = np.load(os.path.join(self.folder, "chunks", f"{loc[0]}.mean.npy"))
    dim = next(iter(means_of.values())).shape[1] if means_of else 0
    means = np.zeros((len(hashes), dim), np.float32)
    for i, loc in enumerate(locs):
      if loc is not None:
        means[i] = means_of[loc[0]][loc[1]]
    store = ChunkTokens(self.folder, locs) if tokens else None
    return means, store, errors, missing

  def disk_bytes(self) -> dict:
    """Bytes on disk: the SQLite file, the chunks' stage-1 vectors and their tokens."""
    sizes = {"sqlite": 0, "mean": 0, "tokens": 0}
    for name in os.listdir(self.folder):
      if name.startswith("index.sqlite"):
        sizes["sqlite"] += os.path.getsize(os.path.join(self.folder, name))
    chunk_dir = os.path.join(self.folder, "chunks")
    for name in os.listdir(chunk_dir):
      kind = name.split(".")[1] if name.count(".") >= 2 else ""
      if kind in sizes and name.endswith(".npy"):
        sizes[kind] += os.path.getsize(os.path.join(chunk_dir, name))
    return sizes
