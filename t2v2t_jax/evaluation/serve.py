"""A local search page over the search engine (`python main.py --mode serve`).

  python main.py --mode serve --config configs/demo.py --workdir runs/demo \
      [--videos DIR] [--port 8000] [--top 10]

One `Searcher` (`search.py`) is built at start-up, as `--mode search` builds it (the
checkpoint, the videos, their cache), then a standard-library HTTP server answers:

  GET /                       the page (`serve_page.py`: a search box, ranked results with
  GET /page.js, /page.css       a preview of each video, both stages' scores, and the
                                relevance picture on request)
  GET /api/info               the library: videos, checkpoint step, rerank depth k, ...
  GET /api/search?q=Q&top=T   the first T results for Q, as JSON
  GET /api/explain?q=Q&top=T&video=V
                              the relevance picture (PNG, `--explain`'s) of library video V,
                              which must be among the first T results for Q
  GET /preview/V              a JPEG strip of the frames the model samples from video V

Videos are named by their index in the library only, never by a path, so the server can
send nothing but the library's own videos. It binds 127.0.0.1 by default and answers only
requests addressed to that host (a web page elsewhere cannot reach it by rebinding a
domain name to 127.0.0.1). Searches run one at a time under a lock: the `Searcher` keeps
state between queries (programs compiled on first use) and is not written for concurrent
calls, and two queries at once would only share the same cores; previews are decoded
outside the lock, in the request's own thread, so they load while a search runs.
Ctrl-C (or SIGTERM) stops the server cleanly.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse

import jax
import numpy as np
from PIL import Image

from input_pipeline import video_decode
from t2v2t_jax.evaluation import search_explain, serve_page
from t2v2t_jax.evaluation.search import Searcher
from t2v2t_jax.errors import Refusal
from t2v2t_jax.evaluation.search_cache import DEFAULT_TOKEN_STORAGE

DEFAULT_PORT = 8000
MAX_TOP = 50                # results one search may return (each has a preview to load)
PREVIEW_HEIGHT = 96         # px; small frames are enlarged to it, large ones shrunk
PREVIEW_MAX_FRAMES = 8      # a strip wider than this is too wide for the page
PREVIEW_GAP = 2             # px of white between the frames of a strip
_PREVIEW_CACHE = 512        # previews kept (~10-40 kB each)
_PICTURE_CACHE = 16         # (query, top) whose relevance pictures are kept
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_PREVIEW_PATH = re.compile(r"^/preview/(\d{1,9})$")


class HTTPError(Exception):
  """A refusal with an HTTP status, sent as `{"error": message}`."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class PortUnavailable(Refusal):
  """The server could not listen on the asked address (the port is taken, say)."""


class SearchApp:
  """What the server answers, without the HTTP: searches, pictures and previews of one
  `Searcher`'s library."""

  def __init__(self, searcher: Searcher, *, default_top: int = 10, log: bool = False):
    self.searcher = searcher
    self.log = log  # print one line per search (the server prints nothing per request)
    self.default_top = max(1, min(int(default_top), MAX_TOP))
    self.num_frames = min(PREVIEW_MAX_FRAMES, int(searcher.config.eval.num_frames))
    self.explain_unavailable = search_explain.explain_unavailable(searcher.config)
    self._lock = threading.Lock()           # one engine call at a time
    # The engine's pictures are written here, not to `workdir/search/` (where `--mode
    # search --explain` leaves the user's), and read back at once.
    self._picture_dir = tempfile.mkdtemp(prefix="t2v2t-serve-pictures-")
    self._cache_lock = threading.Lock()     # the two caches below
    self._previews: collections.OrderedDict[int, bytes] = collections.OrderedDict()
    self._pictures: collections.OrderedDict[tuple[str, int], dict[int, bytes]] = \
        collections.OrderedDict()

  @property
  def paths(self) -> list[str]:
    """The library as the engine indexes it: `SearchResult.video_index` is a position here."""
    return self.searcher.index.paths

  def name(self, path: str) -> str:
    """What the page shows of a path: relative to the library's folder (it may have
    subfolders)."""
    root = self.searcher.video_list.root
    return os.path.relpath(path, root) if root else os.path.basename(path)

  def close(self) -> None:
    shutil.rmtree(self._picture_dir, ignore_errors=True)

  def warm_up(self) -> float:
    """One query as the page sends it (`default_top` results) and, where the model has
    them, its relevance pictures: the programs compile now rather than at the first
    query or click (the pictures' program is compiled per number of results). Seconds."""
    started = time.perf_counter()
    with self._lock:
      self.searcher.search("warm up", top=self.default_top,
                           explain=self.explain_unavailable is None,
                           picture_dir=self._picture_dir)
    return time.perf_counter() - started

  def info(self) -> dict:
    s = self.searcher
    return {"videos": int(np.sum(s.searchable)), "unreadable": len(s.index.failures),
            "source": s.video_list.source, "step": int(s.step), "k": int(s.k),
            "mode": s.config.model.fusion.mode, "default_top": self.default_top,
            "max_top": MAX_TOP, "explain_unavailable": self.explain_unavailable}

  @staticmethod
  def _query(query: str | None) -> str:
    if query is None or not query.strip():
      raise HTTPError(400, "empty query: pass q=<text>")
    return query.strip()

  @staticmethod
  def _top(top: str | int | None, default: int) -> int:
    if top is None or top == "":
      return default
    try:
      value = int(top)
    except ValueError:
      raise HTTPError(400, f"top={top!r} is not a whole number") from None
    if not 1 <= value <= MAX_TOP:
      raise HTTPError(400, f"top={value}: must be between 1 and {MAX_TOP}")
    return value

  def _video(self, video: str | int | None) -> int:
    try:
      index = int(video)
    except (TypeError, ValueError):
      raise HTTPError(400, f"video={video!r} is not a library index") from None
    if not 0 <= index < len(self.paths):
      raise HTTPError(404, f"no video {index}: the library has {len(self.paths)} (0 to "
                           f"{len(self.paths) - 1})")
    return index

  def search(self, query: str | None, top: str | int | None = None) -> dict:
    """`{"query", "searched", "ms", "results": [{rank, video, name, path, stage1, rerank}]}`;
    `ms` is the engine's time for this query (not the wait for an earlier one)."""
    query, top = self._query(query), self._top(top, self.default_top)
    with self._lock:
      started = time.perf_counter()
      results = self.searcher.search(query, top=top)
      ms = 1000 * (time.perf_counter() - started)
    if self.log:
      print(f"{ms:7.1f} ms  top {top:<3} {query!r}", flush=True)
    return {"query": query, "top": top, "searched": int(np.sum(self.searcher.searchable)),
            "ms": ms, "results": [
                {"rank": r.rank, "video": r.video_index, "name": self.name(r.path),
                 "path": r.path, "stage1": r.stage1, "rerank": r.rerank} for r in results]}

  def picture(self, query: str | None, top: str | int | None, video: str | int | None) -> bytes:
    """The relevance picture (PNG bytes) of `video` for `query`.

    It is the engine's `--explain` picture, drawn for the first `top` results of the query
    at once (one batched T2V pass); they are kept, so that asking for the picture of the
    next result of the same search costs nothing."""
    if self.explain_unavailable:
      raise HTTPError(409, f"no relevance picture: {self.explain_unavailable}")
    query, top, video = self._query(query), self._top(top, self.default_top), self._video(video)
    key = (query, top)
    with self._cache_lock:
      pictures = self._pictures.get(key)
      if pictures is not None:
        self._pictures.move_to_end(key)
    if pictures is None:
      with self._lock:
        results = self.searcher.search(query, top=top, explain=True,
                                       picture_dir=self._picture_dir)
        # Read at once: the engine deletes its pictures at the next --explain search.
        pictures = {}
        for r in results:
          if r.picture:
            with open(r.picture, "rb") as f:
              pictures[r.video_index] = f.read()
      with self._cache_lock:
        self._pictures[key] = pictures
        while len(self._pictures) > _PICTURE_CACHE:
          self._pictures.popitem(last=False)
    if video not in pictures:
      raise HTTPError(404, f"video {video} is not among the first {top} results for this query")
    return pictures[video]

  def preview(self, video: str | int) -> bytes:
    """A JPEG strip of the frames the model samples from `video` ('middle' sampling,
    `config.eval.num_frames` of them, at most PREVIEW_MAX_FRAMES), PREVIEW_HEIGHT px high."""
    video = self._video(video)
    with self._cache_lock:
      if video in self._previews:
        self._previews.move_to_end(video)
        return self._previews[video]
    path, videos = self.paths[video], self.searcher.video_list
    try:
      if videos.kind == "image":
        frames = video_decode.read_image(path)
      else:
        frames, _ = video_decode.read_clip(path, self.num_frames, "middle", None,
                                           max_seconds=videos.max_seconds)
    except Exception as e:  # pylint: disable=broad-except (an unreadable file: say so)
      raise HTTPError(422, f"video {video} cannot be read: {type(e).__name__}: {e}") from None
    data = preview_strip(frames)
    with self._cache_lock:
      self._previews[video] = data
      while len(self._previews) > _PREVIEW_CACHE:
        self._previews.popitem(last=False)
    return data


def preview_strip(frames: np.ndarray) -> bytes:
  """uint8 frames [T, H, W, 3] side by side, PREVIEW_HEIGHT px high, as JPEG bytes."""
  frames = np.asarray(frames)
  _, h, w, _ = frames.shape
  width = max(1, round(w * PREVIEW_HEIGHT / h))
  # Nearest neighbour when enlarging keeps small frames sharp; bicubic when shrinking.
  resample = Image.NEAREST if h < PREVIEW_HEIGHT else Image.BICUBIC
  strip = Image.new("RGB", (len(frames) * (width + PREVIEW_GAP) - PREVIEW_GAP, PREVIEW_HEIGHT),
                    (255, 255, 255))
  for t, frame in enumerate(frames):
    strip.paste(Image.fromarray(frame).resize((width, PREVIEW_HEIGHT), resample),
                (t * (width + PREVIEW_GAP), 0))
  out = io.BytesIO()
  strip.save(out, "JPEG", quality=85)
  return out.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
  server: SearchServer
  server_version = "t2v2t-search"

  def do_GET(self):  # noqa: N802 (http.server's name)
    try:
      allowed = self.server.allowed_hosts
      if allowed and (self.headers.get("Host") or "").lower() not in allowed:
        raise HTTPError(421, f"this server answers requests for {sorted(allowed)[0]}")
      app = self.server.app
      if app is None:
        raise HTTPError(503, "the search engine is still loading")
      url = urllib.parse.urlsplit(self.path)
      params = urllib.parse.parse_qs(url.query)
      arg = lambda name: params.get(name, [None])[0]  # noqa: E731
      page = _PAGES.get(url.path)
      if page is not None:
        self._send(200, page[0], page[1].encode())
      elif url.path == "/api/info":
        self._send_json(200, app.info())
      elif url.path == "/api/search":
        self._send_json(200, app.search(arg("q"), arg("top")))
      elif url.path == "/api/explain":
        self._send(200, "image/png", app.picture(arg("q"), arg("top"), arg("video")))
      elif (match := _PREVIEW_PATH.match(url.path)) is not None:
        self._send(200, "image/jpeg", app.preview(match.group(1)),
                   cache="private, max-age=3600")
      else:
        raise HTTPError(404, f"no such page: {url.path}")
    except HTTPError as e:
      self._send_json(e.status, {"error": str(e)})
    except (BrokenPipeError, ConnectionResetError):
      pass  # the browser went away (a newer search replaced this one)
    except Exception as e:  # pylint: disable=broad-except (a bug: keep serving, say what)
      traceback.print_exc()
      with contextlib.suppress(OSError):
        self._send_json(500, {"error": f"{type(e).__name__}: {e}"})

  def _send_json(self, status: int, value) -> None:
    self._send(status, "application/json", json.dumps(value).encode())

  def _send(self, status: int, content_type: str, body: bytes, cache: str = "no-store") -> None:
    self.send_response(status)
    if content_type.startswith(("text/", "application/")):
      content_type += "; charset=utf-8"
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", cache)
    self.send_header("X-Content-Type-Options", "nosniff")
    # Scripts and styles from this server only (no inline script can run, whatever a
    # query or file name contains); pictures also from blob: (the relevance picture).
    self.send_header("Content-Security-Policy",
                     "default-src 'none'; script-src 'self'; style-src 'self'; "
                     "img-src 'self' blob:; connect-src 'self'; form-action 'self'; "
                     "base-uri 'none'; frame-ancestors 'none'")
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
    pass  # `SearchApp(log=True)` prints one line per search; per-request lines would drown it


_PAGES = {"/": ("text/html", serve_page.HTML), "/index.html": ("text/html", serve_page.HTML),
          "/page.js": ("text/javascript", serve_page.JS), "/page.css": ("text/css", serve_page.CSS)}


class SearchServer(http.server.ThreadingHTTPServer):
  """The HTTP server of one `SearchApp` (`app`; None while the engine loads: 503)."""
  daemon_threads = True  # a request still being answered does not keep the process alive
  app: SearchApp | None = None
  allowed_hosts: frozenset = frozenset()  # Host header values accepted (empty: any)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(app: SearchApp | None, host: str = "127.0.0.1", port: int = DEFAULT_PORT
                ) -> SearchServer:
  """An HTTP server (not yet serving) for `app` on `host:port` (port 0: a free one).
  `app` may be set later (`server.app = ...`): `serve` binds the port before it loads the
  engine, so that a port in use fails at once rather than after minutes of indexing."""
  server_class = SearchServer
  if ":" in host:  # an IPv6 address
    server_class = type("SearchServer6", (SearchServer,), {"address_family": socket.AF_INET6})
  server = server_class((host, port), _Handler)
  server.app = app
  if host in _LOOPBACK:
    port = server.server_address[1]
    server.allowed_hosts = frozenset(f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]"))
  return server


def serve(config, workdir: str, *, videos: str | None = None, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT, top: int = 10, progress: bool = True,
          tokens: str = DEFAULT_TOKEN_STORAGE) -> None:
  """`--mode serve`: loads the engine (`tokens`: where the rerank's video tokens come
  from, as for `--mode search`), serves the page until Ctrl-C or SIGTERM."""
  if jax.process_count() > 1:
    raise ValueError("--mode serve runs on one host (jax.process_count() is "
                     f"{jax.process_count()})")
  try:
    server = make_server(None, host, port)
  except OSError as e:
    raise PortUnavailable(f"cannot serve on {host}:{port} ({e.strerror or e}); pick another "
                          f"--port, or 0 for any free one") from None
  try:
    searcher = Searcher(config, workdir, videos=videos, progress=progress, tokens=tokens)
    app = SearchApp(searcher, default_top=top, log=True)
    warm_s = app.warm_up()
  except BaseException:
    server.server_close()
    raise
  server.app = app
  info = app.info()
  print(f"Serving {info['videos']} videos ({info['source']}; query programs compiled in "
        f"{warm_s:.1f} s) at {server.url}  (Ctrl-C stops)", flush=True)
  # Signal handlers can only be set from the main thread (a caller may run `serve` in
  # another: then only its own way of stopping applies).
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.getsignal(signal.SIGTERM)
  if main_thread:
    signal.signal(signal.SIGTERM, _interrupt)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    print("Stopping the server.", flush=True)
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)
    server.server_close()
    app.close()
  sys.stdout.flush()


def _interrupt(signum, frame):
  """SIGTERM stops the server as Ctrl-C does (a `kill` or a service manager)."""
  raise KeyboardInterrupt
