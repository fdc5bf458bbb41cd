"""The one path layer: every file a run reads or writes goes through here, so a path may be
local or a `gs://` URL (Google Cloud Storage), as Orbax's own paths may.

`etils.epath` (what Orbax and Grain use) does the work: local paths through `os`, `gs://`
through fsspec's `gcsfs` (no TensorFlow). What differs between the two is handled here
once, for the callers:
- object stores have no append, no atomic rename of folders and no real directories:
  `write_text` is atomic on both (temp file + rename locally, one object upload on GCS),
  `AppendableText` buffers what a log appends and uploads the whole object at most every
  `flush_secs` (as tensorboardX's own GCS writer does), `move` copies then deletes;
- listing a folder on GCS returns each object's size and CRC32C with no download
  (`files_with_checksums`), which the checkpoint integrity records use instead of
  re-reading a step that was just written.
Only `gs://` is supported: any other URL scheme is refused at once (`check_path`), not
created as a local folder named `s3:/...`. Raw videos are read one object at a time by
PyAV, which cannot be fast from a bucket: media folders on `gs://` are refused with a
pointer to the gcsfuse mount of docs/cloud.md (`check_local_only`).

Tests point gcsfs at a local GCS API (`STORAGE_EMULATOR_HOST`), and Orbax's tensorstore
at the same server (`TENSORSTORE_GCS_HTTP_URL`); tests/test_cloud_storage.py.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import tempfile
import time

from etils import epath

SUPPORTED_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CLOUD_DOC = "docs/cloud.md"


class _QuietBucketType(logging.Filter):
  """gcsfs asks for a bucket's type (zonal or not) through another API and warns on every
  new filesystem when it cannot (no credentials for that API, or an emulator): the
  fallback it takes is the ordinary bucket, which is what every bucket here is."""

  def filter(self, record):
    return "Could not determine bucket type" not in record.getMessage()


logging.getLogger("gcsfs").addFilter(_QuietBucketType())


def scheme(path) -> str | None:
  """`'gs'` for `gs://...`, None for a local path."""
  m = _SCHEME.match(os.fspath(path))
  return m.group(1).lower() if m else None


def is_remote(path) -> bool:
  return scheme(path) is not None


def check_path(path, field: str = "path") -> None:
  """Refuses a URL of a scheme this project cannot read or write (before any work)."""
  s = scheme(path)
  if s is not None and s not in SUPPORTED_SCHEMES:
    raise ValueError(f"{field}={os.fspath(path)!r}: the {s}:// scheme is not supported; use a "
                     f"local path or gs://bucket/... ({CLOUD_DOC}), or mount the storage "
                     "and give the mount's local path")


def check_local_only(path, field: str, why: str) -> None:
  """Refuses a remote path where reading object by object cannot be fast (e.g. videos)."""
  check_path(path, field)
  if is_remote(path):
    raise ValueError(f"{field}={os.fspath(path)!r}: {why} cannot be read fast from a bucket "
                     f"object by object; mount the bucket with gcsfuse (the options are in "
                     f"{CLOUD_DOC}) and give the mount's local path")


def path(p) -> epath.Path:
  return epath.Path(os.fspath(p))


def join(base, *parts) -> str:
  """Joins like `os.path.join`, keeping `gs://` intact."""
  return os.fspath(path(base).joinpath(*parts))


def abspath(p) -> str:
  return os.fspath(p) if is_remote(p) else os.path.abspath(os.fspath(p))


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def isfile(p) -> bool:
  return path(p).is_file()


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p) -> list[str]:
  return sorted(child.name for child in path(p).iterdir()) if isdir(p) else []


def read_text(p) -> str:
  return path(p).read_text()


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def write_text(p, text: str) -> None:
  """Writes `p` whole or not at all: a reader never sees it half-written."""
  if is_remote(p):
    path(p).write_text(text)  # one object upload: visible only once complete
    return
  p = os.fspath(p)
  tmp = f"{p}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, p)


def remove(p) -> None:
  if exists(p):
    path(p).unlink()


def rmtree(p) -> None:
  if exists(p):
    path(p).rmtree()


def move(src, dst) -> None:
  """Moves a file or folder (on GCS: copies every object, then deletes the originals)."""
  if not is_remote(src) and not is_remote(dst):
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  fs = _fsspec(src)
  fs.mv(_bare(src), _bare(dst), recursive=True)


def copy_to_local(p, directory: str | None = None) -> str:
  """A local copy of a remote file (for libraries that only open local files); a local
  path is returned unchanged."""
  if not is_remote(p):
    return os.fspath(p)
  directory = directory or tempfile.mkdtemp(prefix="t2v2t_")
  local = os.path.join(directory, path(p).name)
  with open(local, "wb") as f:
    f.write(read_bytes(p))
  return local


# ----------------------------------------------------------------------------------------
# Checksums of a folder's files, for the checkpoint integrity records.
# ----------------------------------------------------------------------------------------

def _fsspec(p):
  import fsspec  # noqa: PLC0415 (only for remote paths)
  return fsspec.filesystem(scheme(p))


def _bare(p) -> str:
  return _SCHEME.sub("", os.fspath(p))


def crc32c_file(p) -> int:
  """CRC32C of a file (the checksum GCS keeps for every object), read in chunks."""
  import google_crc32c  # noqa: PLC0415
  crc = google_crc32c.Checksum()
  with path(p).open("rb") as f:
    while chunk := f.read(1 << 24):
      crc.update(chunk)
  return int.from_bytes(crc.digest(), "big")


def list_files(directory) -> dict[str, int]:
  """`{path relative to directory: size}` of every file under `directory` (recursive)."""
  directory = os.fspath(directory)
  if not is_remote(directory):
    out = {}
    for root, _, names in os.walk(directory):
      for name in names:
        full = os.path.join(root, name)
        out[os.path.relpath(full, directory)] = os.path.getsize(full)
    return out
  return {rel: size for rel, (size, _) in _remote_listing(directory).items()}


def _remote_listing(directory) -> dict[str, tuple[int, int | None]]:
  fs = _fsspec(directory)
  prefix = _bare(directory).rstrip("/") + "/"
  fs.invalidate_cache(prefix.rstrip("/"))  # another process may have written since
  found = fs.find(prefix, detail=True)
  out = {}
  for name, info in found.items():
    if info.get("type") == "directory" or name.endswith("/"):
      continue
    crc = info.get("crc32c")
    out[name[len(prefix):]] = (int(info["size"]),
                               int.from_bytes(base64.b64decode(crc), "big") if crc else None)
  return out


def files_with_checksums(directory) -> dict[str, tuple[int, int]]:
  """`{relative path: (size, CRC32C)}` of every file under `directory`: on GCS from the
  object listing (no download), locally by reading each file once."""
  if is_remote(directory):
    listing = _remote_listing(directory)
    # An object the store lists without a CRC32C is read once.
    return {rel: (size, crc if crc is not None else crc32c_file(join(directory, rel)))
            for rel, (size, crc) in listing.items()}
  return {rel: (size, crc32c_file(os.path.join(os.fspath(directory), rel)))
          for rel, size in list_files(directory).items()}


# ----------------------------------------------------------------------------------------
# A log that grows: local append, or a buffered object rewritten whole.
# ----------------------------------------------------------------------------------------

class AppendableText:
  """A text file that is appended to (`metrics.jsonl`). Locally an ordinary append-mode
  file, flushed at each `write`. On GCS an object cannot be appended to: the file's text
  (the earlier run's rows included) is kept and uploaded whole at most every
  `flush_secs`, and at `close`."""

  def __init__(self, p, *, flush_secs: float = 30.0):
    self.path = os.fspath(p)
    self.remote = is_remote(self.path)
    self.flush_secs = flush_secs
    if self.remote:
      self._text = read_text(self.path) if exists(self.path) else ""
      self._dirty = False
      self._last = time.monotonic()
    else:
      self._file = open(self.path, "a")

  def write(self, text: str) -> None:
    if not self.remote:
      self._file.write(text)
      self._file.flush()
      return
    self._text += text
    self._dirty = True
    if time.monotonic() - self._last >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    if self.remote and self._dirty:
      path(self.path).write_text(self._text)
      self._dirty = False
      self._last = time.monotonic()

  def close(self) -> None:
    if self.remote:
      self.flush()
    else:
      self._file.close()
