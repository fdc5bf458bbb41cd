"""Annotation files as a compact on-disk index that every process reads without a copy.

Why: held as Python lists, a corpus of 5.5M pairs (WebVid-2.5M + CC3M) takes ~3 GB of
memory, and Grain's `mp_prefetch` pickles the dataset, corpus included, into every worker
process (~100 GB a host at 32 workers). Here an annotation file is read once, in one
streaming pass, into a folder of flat arrays (`.npy`) and UTF-8 blobs; a process reads
the few bytes each lookup needs from those files (`AnnotationIndex` says why positional
reads rather than `mmap`), and a pickled index is only its folder's path, so a worker
reopens the same files instead of receiving a copy: start-up time and memory do not grow
with the worker count, and the files' pages live in the page cache, shared by every
process of the host.

Sources, chosen by the file name's suffix:
  `.db`, `.sqlite`, `.sqlite3`  VindLU's SQLite files (its `preprocess/create_sqlite_db.py`,
      named by its `configs/data.py`, e.g. `webvid_train.sqlite.db`): one table
      `annos(id integer PRIMARY KEY, video|image text, caption text)`, the media column
      named after the media kind, one caption per row; entries in `id` order (VindLU
      reads row `id = i` as sample i).
  anything else                 a JSON list of `{"video" | "image": path, "caption": str | [str]}`
      (VindLU's JSON files), parsed one entry at a time (`json.JSONDecoder.raw_decode` on
      a sliding window), never held whole.
Annotation files may be local paths or `gs://` URLs (read through `etils.epath`; a remote
SQLite file is first copied to the local build folder, as sqlite3 reads local files only).

The index folder (all arrays little-endian `.npy`; P pairs, V distinct videos):
  media.bin, media_spans.npy         the media path of every entry, UTF-8, back to back;
                                     int64 [V, 2] byte span of video v's path (its first entry)
  captions.bin, caption_offsets.npy  the text of every pair, UTF-8; int64 [P + 1] offsets
  pair_video.npy                     int32 [P], the video index of each pair
  vid2txt_order.npy, vid2txt_offsets.npy  the pairs of video v: order[offsets[v]:offsets[v+1]]
  index.json                         what it was built from (source, size, mtime, a hash of
                                     its first and last 64 KiB, kind, paragraph) and the counts
Distinct videos are found by a 128-bit BLAKE2b digest of each path (sorted, stable: the
order of first appearance), the way content-addressed stores deduplicate.

Cache: the folder lives on local disk under `$T2V2T_ANNOTATION_CACHE`, else
`<system temp>/t2v2t_jax_annotations-<uid>`, named by the file's name and a hash of its
identity (path or URL, size, modification time, sample hash) and the reading options, so
an unchanged file is indexed once per host and a changed one gets a new index (the old
one is removed then). It is built in a temporary folder renamed into place, under a file
lock: processes that race (several tasks of a host) wait for the first one's build and
open it. A damaged folder (a file missing or cut short) is built again.

Every entry is checked while the index is built; a bad one raises `AnnotationError`
naming the file and the entry, and leaves no index behind. Media paths are stored in
normal form (`videos/./x` and `videos//x` are `videos/x`, one video) and must stay inside
the media root (no absolute path, no `..` above it); how many videos were named by more
than one spelling is recorded in `index.json` (`aliased_videos`, `alias_examples`) for
`annotations.load_corpus` to warn about.
"""

from __future__ import annotations

import codecs
import collections.abc
import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import sqlite3
import sys
import tempfile
import urllib.parse
import uuid
from array import array

import numpy as np

from t2v2t_jax.errors import Refusal

# 2: media paths normalised (`a/./b` -> `a/b`) and confined to the media root; alias counts.
FORMAT = 2  # bump when the folder's layout or content changes: older folders are rebuilt
MEDIA_KEY = {"video": "video", "image": "image"}
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SQLITE_TABLE = "annos"
SQLITE_MAGIC = b"SQLite format 3\x00"
CACHE_ENV = "T2V2T_ANNOTATION_CACHE"
INFO_FILE = "index.json"
ARRAYS = ("media_spans", "caption_offsets", "pair_video", "vid2txt_order", "vid2txt_offsets")
SAMPLE_BYTES = 1 << 16
_CHUNK = 1 << 22  # JSON read size; a longer entry doubles it until the entry fits
_WRITE_BUFFER = 1 << 20


class AnnotationError(Refusal):
  """A malformed annotation file or entry; the message names the file and entry index."""


def is_url(path: str) -> bool:
  return "://" in os.fspath(path)


def is_sqlite(anno_file: str) -> bool:
  return os.fspath(anno_file).lower().endswith(SQLITE_SUFFIXES)


def default_name(anno_file: str) -> str:
  """The corpus name of a file: its base name without `.json` / `.sqlite.db` / `.db` ..."""
  name = os.path.basename(os.fspath(anno_file).rstrip("/"))
  lower = name.lower()
  for suffix in (".sqlite.db", ".sqlite3", ".sqlite", ".db", ".json"):
    if lower.endswith(suffix):
      return name[:-len(suffix)]
  return os.path.splitext(name)[0]


def _epath(path: str):
  from etils import epath  # noqa: PLC0415 (only for URLs: keeps etils out of the common path)
  return epath.Path(path)


def _open_binary(path: str):
  return _epath(path).open("rb") if is_url(path) else open(path, "rb")  # noqa: SIM115


# ---------------------------------------------------------------------------------------
# What identifies a file's version


def stamp(anno_file: str) -> dict:
  """Identity of the file as it is now: `source` (real path or URL), `size`, `mtime_ns`
  and `sample` (SHA-256 of its first and last 64 KiB, which catches a rewrite of the same
  size within the clock's resolution). Raises AnnotationError when there is no such file."""
  anno_file = os.fspath(anno_file)
  try:
    if is_url(anno_file):
      st = _epath(anno_file).stat()
      if st.is_directory:
        raise FileNotFoundError(anno_file)
      source, size, mtime_ns = anno_file, int(st.length), int(st.mtime) * 10 ** 9
    else:
      st = os.stat(anno_file)
      if not os.path.isfile(anno_file):
        raise FileNotFoundError(anno_file)
      source, size, mtime_ns = os.path.realpath(anno_file), st.st_size, st.st_mtime_ns
    digest = hashlib.sha256()
    with _open_binary(anno_file) as f:
      digest.update(f.read(SAMPLE_BYTES))
      if size > 2 * SAMPLE_BYTES:
        f.seek(size - SAMPLE_BYTES)
        digest.update(f.read(SAMPLE_BYTES))
  except FileNotFoundError as e:
    raise AnnotationError(f"{anno_file}: annotation file not found") from e
  except OSError as e:
    raise AnnotationError(f"{anno_file}: annotation file cannot be read ({e})") from e
  return {"source": source, "size": size, "mtime_ns": mtime_ns, "sample": digest.hexdigest()}


# ---------------------------------------------------------------------------------------
# Reading entries: (media path, captions) one at a time, checked


def _entry_captions(anno_file: str, where: str, entry: dict) -> list[str]:
  if "caption" not in entry:
    raise AnnotationError(f"{anno_file}: {where}: missing key 'caption' (keys: {sorted(entry)})")
  caption = entry["caption"]
  if isinstance(caption, str):
    return [caption]
  if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
    return caption
  raise AnnotationError(f"{anno_file}: {where}: 'caption' must be a string or a "
                        f"non-empty list of strings, got {caption!r:.80}")


def check_entry(anno_file: str, index: int, entry, kind: str) -> tuple[str, list[str]]:
  """`(media path, captions)` of entry `index` of a JSON file, or AnnotationError."""
  where = f"entry {index}"
  if not isinstance(entry, dict):
    raise AnnotationError(f"{anno_file}: {where}: expected a JSON object, got "
                          f"{type(entry).__name__}")
  key = MEDIA_KEY[kind]
  other = "image" if kind == "video" else "video"
  if key not in entry:
    hint = f" (it has {other!r}: is this an {other} corpus?)" if other in entry else ""
    raise AnnotationError(f"{anno_file}: {where}: missing key {key!r} for a {kind} corpus{hint}")
  path = entry[key]
  if not isinstance(path, str) or not path:
    raise AnnotationError(f"{anno_file}: {where}: {key!r} must be a non-empty string path, "
                          f"got {path!r:.80}")
  return path, _entry_captions(anno_file, where, entry)


def normalise_media_path(anno_file: str, where: str, key: str, path: str) -> str:
  """The media path of an entry in its one canonical spelling, or AnnotationError.

  Why: the path is joined to the media root, so an absolute path or one that climbs out
  with `..` would read (and, in `prepare`, publish frames of) files outside the corpus;
  and `videos/x`, `videos/./x` and `videos//x` would otherwise be three gallery videos
  with the same frames, which splits one video's positives and ground truths. The check
  is lexical (no file system access, so it holds for media that is not there yet):
  symbolic links inside the media root are followed as they are, which is how corpora
  spread over several disks are usually laid out.
  """
  if "\x00" in path:
    raise AnnotationError(f"{anno_file}: {where}: {key!r} {path!r:.80} holds a NUL character, "
                          "which no file name can")
  if posixpath.isabs(path) or os.path.isabs(path):
    raise AnnotationError(f"{anno_file}: {where}: {key!r} {path!r:.120} is an absolute path; "
                          "media paths must be relative to the corpus's media root")
  normal = posixpath.normpath(path)
  if normal == ".":
    raise AnnotationError(f"{anno_file}: {where}: {key!r} {path!r:.120} names the media root "
                          "itself, not a file under it")
  if normal == ".." or normal.startswith("../"):
    raise AnnotationError(f"{anno_file}: {where}: {key!r} {path!r:.120} leads outside the "
                          f"media root (it resolves to {normal!r:.120}); media paths must stay "
                          "inside it")
  return normal


_WS = re.compile(r"[ \t\n\r]*")


class _JsonListReader:
  """The elements of a file's top-level JSON list, parsed one at a time from a window of
  the text (memory: one read chunk and one entry, whatever the file's size). Errors give
  json's message with the position in the whole file."""

  def __init__(self, anno_file: str, f):
    self.anno_file, self.f = anno_file, f
    self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    self.json = json.JSONDecoder()
    self.buf, self.pos, self.eof = "", 0, False
    self.base = 0  # characters dropped before `buf`
    self.base_lines = 0  # newlines among them
    self.last_newline = -1  # position of the last of them
    self.bytes_read, self.head = 0, b""

  def _more(self, size: int | None = None) -> bool:
    """Appends up to `size` more bytes of text to the window (dropping what was parsed);
    False once the file is exhausted."""
    if self.eof:
      return False
    data = self.f.read(size or _CHUNK)
    if not self.head:
      self.head = data[:len(SQLITE_MAGIC)]
    try:
      text = self.utf8.decode(data, final=not data)
    except UnicodeDecodeError as e:
      raise AnnotationError(f"{self.anno_file}: not valid UTF-8 (near byte "
                            f"{self.bytes_read + max(e.start, 0)}: {e.reason}){self._hint()}"
                            ) from e
    self.bytes_read += len(data)
    self.eof = not data
    if self.pos:
      dropped = self.buf[:self.pos]
      newline = dropped.rfind("\n")
      if newline >= 0:
        self.base_lines += dropped.count("\n")
        self.last_newline = self.base + newline
      self.base += self.pos
      self.buf, self.pos = self.buf[self.pos:], 0
    self.buf += text
    return True

  def _skip(self) -> str:
    """Skips whitespace; the next character ('' at the end of the file)."""
    while True:
      self.pos = _WS.match(self.buf, self.pos).end()
      if self.pos < len(self.buf):
        return self.buf[self.pos]
      if not self._more():
        return ""

  def _invalid(self, msg: str, pos: int) -> AnnotationError:
    where = self.base + pos
    newline = self.buf.rfind("\n", 0, pos)
    line = self.base_lines + self.buf.count("\n", 0, pos) + 1
    column = pos - newline if newline >= 0 else where - self.last_newline
    return AnnotationError(f"{self.anno_file}: not valid JSON ({msg}: line {line} column "
                           f"{column} (char {where})){self._hint()}")

  def _hint(self) -> str:
    if self.head == SQLITE_MAGIC:
      return f"; it is a SQLite database: name it with a suffix of {list(SQLITE_SUFFIXES)}"
    return ""

  def _value(self):
    size = _CHUNK
    while True:
      try:
        value, end = self.json.raw_decode(self.buf, self.pos)
        if end < len(self.buf) or self.eof:  # else a number may go on in the next chunk
          self.pos = end
          return value
      except json.JSONDecodeError as e:
        # Cut by the window's end (an unfinished string or token): read on. Anything else
        # is an error in the file.
        cut = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 8
        if self.eof or not cut:
          raise self._invalid(e.msg, e.pos) from None
      self._more(size)
      size *= 2

  def __iter__(self):
    first = self._skip()
    if first != "[":
      # Not a list: parse it whole for the message json.load would give.
      while self._more():
        pass
      try:
        data = json.loads(self.buf[self.pos:])
      except json.JSONDecodeError as e:
        raise self._invalid(e.msg, self.pos + e.pos) from None
      raise AnnotationError(f"{self.anno_file}: expected a JSON list of entries, got "
                            f"{type(data).__name__}")
    self.pos += 1
    if self._skip() == "]":
      self.pos += 1
    else:
      # The fast path (json's C scanner on the window, no refill, no error) runs for all
      # but the few entries cut by the window's end; those and every error take the
      # general path (`_skip`, `_value`).
      scan = self.json.scan_once
      while True:
        buf, pos = self.buf, self.pos
        end = -1
        if pos < len(buf):
          if buf[pos] in " \t\n\r":
            pos = _WS.match(buf, pos).end()
          try:
            value, end = scan(buf, pos)
          except (StopIteration, json.JSONDecodeError):
            end = -1
          if end >= len(buf) and not self.eof:  # a number may go on in the next chunk
            end = -1
        if end < 0:
          self._skip()
          value = self._value()
        else:
          self.pos = end
        yield value
        buf, pos = self.buf, self.pos
        if pos < len(buf) and buf[pos] == ",":
          self.pos = pos + 1
          continue
        c = self._skip()
        self.pos += 1
        if c == "]":
          break
        if c != ",":
          raise self._invalid("Expecting ',' delimiter", self.pos - 1)
    if self._skip():
      raise self._invalid("Extra data", self.pos)


def json_entries(anno_file: str, f, kind: str):
  """`(where, path, captions)` of each entry of a JSON annotation file open as `f` (binary);
  `where` names the entry for error messages."""
  reader = iter(_JsonListReader(anno_file, f))
  i = 0
  while True:
    try:
      entry = next(reader)
    except StopIteration:
      return
    except RecursionError:
      # json's decoder recurses once per nesting level: `[[[[...` a few thousand deep
      # (a few KB of text) would otherwise escape as a bare RecursionError. No entry of
      # this format nests more than two levels, so depth is refused, not raised.
      raise AnnotationError(f"{anno_file}: entry {i}: nested too deeply to be an annotation "
                            f"entry (more than ~{sys.getrecursionlimit()} levels of JSON lists "
                            "or objects)") from None
    yield (f"entry {i}", *check_entry(anno_file, i, entry, kind))
    i += 1


def sqlite_entries(anno_file: str, db_path: str, kind: str):
  """`(path, [caption])` of each row of a VindLU SQLite file (local copy at `db_path`), in
  `id` order. Errors name the entry by its position and its `id`."""
  key = MEDIA_KEY[kind]
  other = "image" if kind == "video" else "video"
  uri = "file:" + urllib.parse.quote(os.path.abspath(db_path)) + "?mode=ro"
  try:
    con = sqlite3.connect(uri, uri=True)
  except sqlite3.Error as e:
    raise AnnotationError(f"{anno_file}: cannot open as SQLite ({e})") from e
  i = -1  # the last entry read: a row sqlite cannot decode fails while it is fetched
  try:
    try:
      columns = [row[1] for row in con.execute(f"PRAGMA table_info({SQLITE_TABLE})")]
      if not columns:
        tables = [row[0] for row in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    except sqlite3.DatabaseError as e:
      raise AnnotationError(f"{anno_file}: not a SQLite database ({e})") from e
    layout = (f"VindLU's layout: {SQLITE_TABLE}(id integer PRIMARY KEY, video|image text, "
              "caption text)")
    if not columns:
      raise AnnotationError(f"{anno_file}: no table {SQLITE_TABLE!r} ({layout}); tables: {tables}")
    for needed in ("id", key, "caption"):
      if needed not in columns:
        hint = (f" (it has {other!r}: is this an {other} corpus?)"
                if needed == key and other in columns else "")
        raise AnnotationError(f"{anno_file}: table {SQLITE_TABLE!r} has no column {needed!r} "
                              f"for a {kind} corpus{hint} (columns: {columns}; {layout})")
    rows = con.execute(f'SELECT "id", "{key}", "caption" FROM {SQLITE_TABLE} ORDER BY "id"')
    for i, (row_id, path, caption) in enumerate(rows):
      if not isinstance(path, str) or not path:
        raise AnnotationError(f"{anno_file}: entry {i} (id {row_id}): {key!r} must be a "
                              f"non-empty string path, got {path!r:.80}")
      if not isinstance(caption, str):
        raise AnnotationError(f"{anno_file}: entry {i} (id {row_id}): 'caption' must be a "
                              f"string, got {caption!r:.80}")
      yield f"entry {i} (id {row_id})", path, [caption]
  except sqlite3.DatabaseError as e:
    # A text value that is not valid UTF-8 fails here, while row i + 1 is fetched.
    raise AnnotationError(f"{anno_file}: entry {i + 1}: SQLite read failed ({e})") from e
  finally:
    con.close()


# ---------------------------------------------------------------------------------------
# Building the folder


def _build(folder: str, anno_file: str, identity: dict, kind: str, paragraph: bool) -> dict:
  """Reads the file and writes the index into `folder` (empty, existing); its info."""
  entry_ends = array("q", [0])  # end offset of each entry's path in media.bin
  caption_ends = array("q", [0])
  counts = array("I")  # pairs per entry
  digests = bytearray()  # 16 bytes per entry, of the normalised path
  # Entries whose path was written in another spelling than its normal form, with the
  # digest of that spelling: enough to tell, per video, how many spellings name it.
  respelt, respelt_digests, respelt_examples = array("q"), bytearray(), {}
  media_key = MEDIA_KEY[kind]
  with contextlib.ExitStack() as stack:
    if is_sqlite(anno_file):
      db = anno_file
      if is_url(anno_file):  # sqlite3 reads local files only
        db = os.path.join(folder, "source.db.tmp")
        with _open_binary(anno_file) as src, open(db, "wb") as dst:
          shutil.copyfileobj(src, dst, _WRITE_BUFFER)
        stack.callback(os.remove, db)
      entries = sqlite_entries(anno_file, db, kind)
    else:
      entries = json_entries(anno_file, stack.enter_context(_open_binary(anno_file)), kind)
    stack.callback(entries.close)  # closes the database now, also after an error
    media_f, text_f = (stack.enter_context(open(os.path.join(folder, name), "wb",
                                                buffering=_WRITE_BUFFER))
                       for name in ("media.bin", "captions.bin"))
    media_end = text_end = 0
    for where, raw_path, captions in entries:
      path = normalise_media_path(anno_file, where, media_key, raw_path)
      if path != raw_path:
        respelt.append(len(counts))
        respelt_digests += hashlib.blake2b(raw_path.encode("utf-8", "surrogatepass"),
                                           digest_size=16).digest()
        if len(respelt_examples) < _ALIAS_EXAMPLE_POOL:
          respelt_examples[len(counts)] = (where, raw_path)
      # surrogatepass: a JSON string may hold a lone surrogate ("\ud800"); it round-trips.
      data = path.encode("utf-8", "surrogatepass")
      media_f.write(data)
      media_end += len(data)
      entry_ends.append(media_end)
      digests += hashlib.blake2b(data, digest_size=16).digest()
      texts = [" ".join(c.strip() for c in captions)] if paragraph else captions
      for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        text_f.write(data)
        text_end += len(data)
        caption_ends.append(text_end)
      counts.append(len(texts))
  num_entries = len(counts)
  if not num_entries:
    raise AnnotationError(f"{anno_file}: the file holds no entries")
  num_pairs = len(caption_ends) - 1
  if num_pairs >= 2 ** 31:
    raise AnnotationError(f"{anno_file}: {num_pairs} pairs: more than int32 indices hold")

  # Distinct videos in order of first appearance, by digest: a stable sort puts each
  # path's entries together in file order, so a group's first member is its first entry.
  keys = np.frombuffer(digests, np.uint64).reshape(num_entries, 2)
  order = np.lexsort((keys[:, 1], keys[:, 0]))
  sorted_keys = keys[order]
  starts = np.ones(num_entries, bool)
  starts[1:] = np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)
  del sorted_keys, keys, digests
  group = np.cumsum(starts) - 1  # group of each sorted entry
  first = order[starts]  # first entry of each group
  by_first = np.argsort(first, kind="stable")
  video_of_group = np.empty(len(first), np.int32)
  video_of_group[by_first] = np.arange(len(first), dtype=np.int32)
  entry_video = np.empty(num_entries, np.int32)
  entry_video[order] = video_of_group[group]
  del order, group, starts, video_of_group
  media_entries = first[by_first]
  ends = np.frombuffer(entry_ends, np.int64)
  arrays = {
      "media_spans": np.stack([ends[media_entries], ends[media_entries + 1]], axis=1),
      "caption_offsets": np.frombuffer(caption_ends, np.int64),
      "pair_video": np.repeat(entry_video, np.frombuffer(counts, np.uint32)),
  }
  num_videos = len(media_entries)
  pair_video = arrays["pair_video"]
  arrays["vid2txt_order"] = np.argsort(pair_video, kind="stable").astype(np.int32)
  vid2txt_offsets = np.zeros(num_videos + 1, np.int64)
  np.cumsum(np.bincount(pair_video, minlength=num_videos), out=vid2txt_offsets[1:])
  arrays["vid2txt_offsets"] = vid2txt_offsets
  aliased, examples = _aliases(entry_video, media_entries, num_videos, respelt,
                               respelt_digests, respelt_examples)
  for name, value in arrays.items():
    np.save(os.path.join(folder, name + ".npy"), np.ascontiguousarray(value).astype(
        value.dtype.newbyteorder("<"), copy=False))
  info = dict(identity, format=FORMAT, anno_file=anno_file, kind=kind, paragraph=paragraph,
              num_entries=num_entries, num_pairs=num_pairs, num_videos=num_videos,
              sqlite=is_sqlite(anno_file), build_id=uuid.uuid4().hex,
              respelt_entries=len(respelt), aliased_videos=aliased, alias_examples=examples)
  with open(os.path.join(folder, INFO_FILE), "w") as f:
    json.dump(info, f, indent=1)
  return info


_ALIAS_EXAMPLE_POOL = 1000  # respelt entries remembered by name for the warning's examples
_ALIAS_EXAMPLES = 3  # examples the warning shows


def _aliases(entry_video: np.ndarray, media_entries: np.ndarray, num_videos: int,
             respelt: array, respelt_digests: bytearray, examples: dict) -> tuple[int, list]:
  """How many videos are named by more than one spelling of their path, and a few
  examples (`entry 7: 'videos/./x' is entry 3's video 'videos/x'`).

  A spelling is the path as written; every entry not in `respelt` is written in normal
  form. Only the respelt entries' digests are held, so a file written in normal form
  costs nothing here.
  """
  if not len(respelt):
    return 0, []
  flagged = np.frombuffer(respelt, np.int64)
  plain = np.ones(len(entry_video), bool)
  plain[flagged] = False
  spellings = np.bincount(entry_video[plain], minlength=num_videos).clip(max=1)
  raw = np.frombuffer(respelt_digests, np.uint64).reshape(-1, 2)
  rows = np.unique(np.column_stack([entry_video[flagged].astype(np.uint64), raw]), axis=0)
  spellings += np.bincount(rows[:, 0].astype(np.int64), minlength=num_videos)
  is_aliased = spellings > 1
  shown = []
  for entry, (where, raw_path) in examples.items():
    video = int(entry_video[entry])
    if is_aliased[video] and len(shown) < _ALIAS_EXAMPLES:
      first = int(media_entries[video])
      shown.append(f"{where}: {raw_path!r:.120} is {posixpath.normpath(raw_path)!r:.120}, "
                   f"the video first named by entry {first}")
  return int(is_aliased.sum()), shown


def cache_root(cache_dir: str | None = None) -> str:
  """Where index folders go: `cache_dir`, else $T2V2T_ANNOTATION_CACHE, else a per-user
  folder under the system's temporary folder (local disk)."""
  if cache_dir:
    return os.fspath(cache_dir)
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]
  user = f"-{os.getuid()}" if hasattr(os, "getuid") else ""
  return os.path.join(tempfile.gettempdir(), f"t2v2t_jax_annotations{user}")


def _folder_name(identity: dict, kind: str, paragraph: bool) -> str:
  slug = re.sub(r"[^A-Za-z0-9_.-]", "_", default_name(identity["source"]))[:48]
  key = json.dumps([FORMAT, identity, kind, bool(paragraph)], sort_keys=True)
  return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive lock on `path` (created if needed) for the block: concurrent builders of
  one index wait for each other. Without fcntl (not POSIX) the block runs unlocked; the
  rename into place still keeps a reader from seeing half an index."""
  try:
    import fcntl  # noqa: PLC0415
  except ImportError:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_info(folder: str) -> dict | None:
  try:
    with open(os.path.join(folder, INFO_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _remove(folder: str) -> None:
  """Removes a folder another process may be reading: renamed aside first (atomic), so
  nobody opens it half-deleted; open maps stay valid (POSIX unlink semantics)."""
  aside = f"{folder}.removed-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    os.rename(folder, aside)
  except OSError:
    return
  shutil.rmtree(aside, ignore_errors=True)
  with contextlib.suppress(OSError):
    os.remove(folder + ".lock")


def _prune(root: str, keep: str, identity: dict) -> None:
  """Removes the index folders of older versions of this file and of local files that no
  longer exist, and builds interrupted mid-way (their builder died holding the lock)."""
  try:
    names = os.listdir(root)
  except OSError:
    return
  for name in names:
    path = os.path.join(root, name)
    if name == keep or name.endswith(".lock") or not os.path.isdir(path):
      continue
    if ".tmp-" in name or ".removed-" in name:
      if name.startswith(keep + ".tmp-") or ".removed-" in name:
        shutil.rmtree(path, ignore_errors=True)
      continue
    info = _read_info(path)
    if info is None:
      continue
    gone = not is_url(info.get("source", "")) and not os.path.exists(info.get("source", ""))
    stale = info.get("source") == identity["source"] and any(
        info.get(k) != identity[k] for k in ("size", "mtime_ns", "sample"))
    if gone or stale:
      _remove(path)


def open_index(anno_file: str, *, kind: str = "video", paragraph: bool = False,
               identity: dict | None = None, cache_dir: str | None = None) -> AnnotationIndex:
  """The index of `anno_file` read as a `kind` corpus (captions joined per entry with
  `paragraph`), built now unless this host has it already. `identity`: `stamp(anno_file)`
  if the caller has it. Raises AnnotationError for a missing or malformed file."""
  if kind not in MEDIA_KEY:
    raise AnnotationError(f"{anno_file}: corpus kind {kind!r} is not one of {sorted(MEDIA_KEY)}")
  identity = identity or stamp(anno_file)
  root = cache_root(cache_dir)
  name = _folder_name(identity, kind, paragraph)
  folder = os.path.join(root, name)
  index = AnnotationIndex.open_checked(folder)
  if index is not None:
    return index
  os.makedirs(root, exist_ok=True)
  with _locked(folder + ".lock"):
    index = AnnotationIndex.open_checked(folder)  # another process built it meanwhile
    if index is not None:
      return index
    if os.path.exists(folder):
      _remove(folder)  # damaged
    _prune(root, name, identity)
    tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
      _build(tmp, anno_file, identity, kind, paragraph)
      os.rename(tmp, folder)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  index = AnnotationIndex.open_checked(folder)
  if index is None:
    raise AnnotationError(f"{anno_file}: its index {folder} was built but does not open")
  return index


# ---------------------------------------------------------------------------------------
# Reading the folder


class StringTable(collections.abc.Sequence):
  """Read-only sequence of the strings of one column of an index ('media' or 'captions'),
  read from the file on access. Compares equal to any sequence of the same strings."""

  def __init__(self, index: AnnotationIndex, column: str):
    self.index, self.column = index, column

  def __len__(self) -> int:
    return self.index.num_videos if self.column == "media" else self.index.num_pairs

  def __getitem__(self, i):
    if isinstance(i, slice):
      start, stop, step = i.indices(len(self))
      if step == 1:
        return self.index.strings(self.column, start, max(start, stop))
      return [self[j] for j in range(start, stop, step)]
    n = len(self)
    i = int(i)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"{self.column} index {i} out of range [0, {n})")
    return self.index.string(self.column, i)

  def __iter__(self):
    block = 1 << 15
    for start in range(0, len(self), block):
      yield from self.index.strings(self.column, start, min(start + block, len(self)))

  def __eq__(self, other):
    if not isinstance(other, collections.abc.Sequence) or isinstance(other, (str, bytes)):
      return NotImplemented
    return len(self) == len(other) and all(a == b for a, b in zip(self, other))

  __hash__ = None

  def __repr__(self) -> str:
    return f"StringTable({self.column}, {len(self)} strings, {self.index.directory})"


class Ragged(collections.abc.Sequence):
  """Read-only sequence of int lists: the pair indices of each video (`vid2txt`)."""

  def __init__(self, index: AnnotationIndex):
    self.index = index

  def __len__(self) -> int:
    return self.index.num_videos

  def __getitem__(self, v):
    if isinstance(v, slice):
      return [self[j] for j in range(*v.indices(len(self)))]
    v = int(v)
    if v < 0:
      v += len(self)
    if not 0 <= v < len(self):
      raise IndexError(f"video index {v} out of range [0, {len(self)})")
    return self.index.pairs_of_video(v)

  def __eq__(self, other):
    if not isinstance(other, collections.abc.Sequence) or isinstance(other, (str, bytes)):
      return NotImplemented
    return len(self) == len(other) and all(list(a) == list(b) for a, b in zip(self, other))

  __hash__ = None


class _Files:
  """The open files of an index in one process: per file its descriptor and, for an
  array, where its data starts, its dtype and shape. Closed when collected."""

  def __init__(self):
    self.fds: dict[str, int] = {}
    self.arrays: dict[str, tuple[int, np.dtype, tuple]] = {}
    self.sizes: dict[str, int] = {}

  def __del__(self):
    for fd in self.fds.values():
      with contextlib.suppress(OSError):
        os.close(fd)


class AnnotationIndex:
  """An index folder, read in each process with positional reads (`os.pread`) of the
  bytes a lookup needs, files opened on first use.

  Not `mmap`: a mapped page counts in the resident memory of every process that touched
  it, and the kernel maps page-cache pages in folios of up to 2 MiB, so a worker that
  reads a few thousand random pairs would show most of the index as its own memory (the
  bytes are shared, but RSS-based limits and monitors count them once per worker). Read
  with `pread`, the index lives in the page cache only, shared by every process and
  counted by none; a lookup is a few system calls (microseconds, against milliseconds of
  decoding). `pair_video` as a whole array (evaluation, checks) is a read-only memory
  map, opened only when asked for.

  Pickles as its folder's path and info: a Grain worker reopens the files, it is not
  sent a copy.
  """

  FILES = ("media.bin", "captions.bin") + tuple(name + ".npy" for name in ARRAYS)

  def __init__(self, directory: str, info: dict):
    self.directory = directory
    self.info = info
    self._files: _Files | None = None
    self._pair_video: np.ndarray | None = None

  @classmethod
  def open_checked(cls, directory: str) -> AnnotationIndex | None:
    """The index in `directory` if it is complete and of this code's format, else None."""
    info = _read_info(directory)
    if info is None or info.get("format") != FORMAT:
      return None
    index = cls(directory, info)
    try:
      index._open()
    except AnnotationError:
      return None
    return index

  def __getstate__(self):
    return {"directory": self.directory, "info": self.info}

  def __setstate__(self, state):
    self.__init__(state["directory"], state["info"])

  def _damaged(self, what: str) -> AnnotationError:
    return AnnotationError(f"{self.info.get('anno_file')}: its annotation index {self.directory} "
                           f"cannot be read ({what}); it is rebuilt when the corpus is loaded "
                           f"again")

  def _open(self) -> _Files:
    if self._files is not None:
      return self._files
    files = _Files()
    try:
      for name in self.FILES:
        fd = os.open(os.path.join(self.directory, name), os.O_RDONLY)
        files.fds[name] = fd
        files.sizes[name] = os.fstat(fd).st_size
        if name.endswith(".npy"):
          with os.fdopen(os.dup(fd), "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if fortran:
              raise ValueError(f"{name} is in Fortran order")
            files.arrays[name[:-4]] = (f.tell(), dtype, shape)
    except (OSError, ValueError) as e:
      raise self._damaged(f"{type(e).__name__}: {e}") from e
    p, v = self.num_pairs, self.num_videos
    expected = {"media_spans": ((v, 2), np.int64), "caption_offsets": ((p + 1,), np.int64),
                "pair_video": ((p,), np.int32), "vid2txt_order": ((p,), np.int32),
                "vid2txt_offsets": ((v + 1,), np.int64)}
    problems = []
    for name, (shape, dtype) in expected.items():
      offset, got_dtype, got_shape = files.arrays[name]
      if got_shape != shape or got_dtype != np.dtype(dtype).newbyteorder("<"):
        problems.append(f"{name}.npy holds {got_dtype} {got_shape}, expected {shape}")
      elif files.sizes[name + ".npy"] < offset + int(np.prod(shape)) * got_dtype.itemsize:
        problems.append(f"{name}.npy is cut short")
    self._files = files
    if not problems:
      # Videos are numbered in order of first appearance, so the last one's path ends
      # last: O(1) checks (a worker must not read whole arrays to open the index).
      if files.sizes["captions.bin"] != self._int("caption_offsets", p):
        problems.append("captions.bin does not match its offsets")
      if v and files.sizes["media.bin"] < self._int("media_spans", 2 * v - 1):
        problems.append("media.bin is cut short")
    if problems:
      self._files = None
      raise self._damaged("; ".join(problems))
    return files

  def _read(self, name: str, start: int, count: int) -> bytes:
    """Bytes [start, start + count) of file `name`."""
    files = self._open()
    data = os.pread(files.fds[name], count, start)
    if len(data) != count:
      raise self._damaged(f"{name} is shorter than {start + count} bytes")
    return data

  def _ints(self, array: str, start: int, count: int) -> np.ndarray:
    """Elements [start, start + count) of an array file, flattened."""
    offset, dtype, _ = self._open().arrays[array]
    return np.frombuffer(self._read(array + ".npy", offset + start * dtype.itemsize,
                                    count * dtype.itemsize), dtype)

  def _int(self, array: str, i: int) -> int:
    offset, dtype, _ = self._open().arrays[array]
    return int.from_bytes(self._read(array + ".npy", offset + i * dtype.itemsize,
                                     dtype.itemsize), "little", signed=True)

  def _spans(self, column: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte starts and ends of strings [start, stop) of a column."""
    if column == "media":
      spans = self._ints("media_spans", 2 * start, 2 * (stop - start)).reshape(-1, 2)
      return spans[:, 0], spans[:, 1]
    offsets = self._ints("caption_offsets", start, stop - start + 1)
    return offsets[:-1], offsets[1:]

  def string(self, column: str, i: int) -> str:
    """String i of 'media' (video i's path) or 'captions' (pair i's text)."""
    begin, end = (x.item() for x in np.concatenate(self._spans(column, i, i + 1)))
    return self._read(f"{column}.bin", begin, end - begin).decode("utf-8", "surrogatepass")

  def strings(self, column: str, start: int, stop: int) -> list[str]:
    """Strings [start, stop) of a column, in one read of their bytes."""
    if stop <= start:
      return []
    begins, ends = self._spans(column, start, stop)
    first = int(begins.min())
    data = self._read(f"{column}.bin", first, int(ends.max()) - first)
    return [data[b - first:e - first].decode("utf-8", "surrogatepass")
            for b, e in zip(begins.tolist(), ends.tolist())]

  def video_of_pair(self, i: int) -> int:
    """The video index of pair i (one read)."""
    return self._int("pair_video", int(i))

  def pairs_of_video(self, v: int) -> list[int]:
    begin, end = self._ints("vid2txt_offsets", v, 2).tolist()
    return self._ints("vid2txt_order", begin, end - begin).tolist()

  @property
  def num_pairs(self) -> int:
    return int(self.info["num_pairs"])

  @property
  def num_videos(self) -> int:
    return int(self.info["num_videos"])

  @property
  def media(self) -> StringTable:
    return StringTable(self, "media")

  @property
  def captions(self) -> StringTable:
    return StringTable(self, "captions")

  @property
  def pair_video(self) -> np.ndarray:
    """int32 [P], read-only memory map (for whole-array use; per pair: `video_of_pair`)."""
    if self._pair_video is None:
      self._open()
      self._pair_video = np.load(os.path.join(self.directory, "pair_video.npy"),
                                 mmap_mode="r", allow_pickle=False)
    return self._pair_video

  @property
  def vid2txt(self) -> Ragged:
    return Ragged(self)
