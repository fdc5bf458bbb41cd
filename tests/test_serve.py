"""`--mode serve`: the search page's HTTP API, and the page itself in headless Chromium.

The library: the three synthetic test videos, copied into a folder under names that would
break a page that pasted them as markup (`<b>`, `&`, quotes) and into a subfolder. The
model is the tiny t2v2t with its initial (random) parameters: nothing is trained, so the
ranking is not meaningful, but it is deterministic, and every answer of the server is
checked against the engine's own answer to the same query (`Searcher.search`), which
`tests/test_search.py` checks against the evaluation code.

The browser test drives Debian's Chromium through the DevTools protocol over a pipe
(`--remote-debugging-pipe`: NUL-terminated JSON on file descriptors 3 and 4, so no
websocket library is needed). It types a query into the search box, presses Enter, and
checks the list against the engine's ranking; then it clicks the top result's relevance
button, takes a screenshot and checks that the picture is drawn on screen as the server
sent it.
"""

import base64
import fcntl
import http.client
import io
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from configs import demo
from input_pipeline import synthetic, video_decode
from t2v2t_jax.evaluation import explain, search_explain
from t2v2t_jax.evaluation import serve as serve_lib
from t2v2t_jax.evaluation.search import Searcher

# Markup in a file name ('/' cannot be in one): a page must show it as text.
ODD_NAME = '<b>bold & "quoted" \'clip\'.mp4'
NUM_VIDEOS = 3


def _random_params(config, workdir, mesh, purpose="Evaluating"):
  """`restore.load_params` without a checkpoint: the tiny model's initial parameters."""
  from flax import nnx  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import create_model  # noqa: PLC0415
  graphdef, params = nnx.split(create_model(config.model), nnx.Param)
  return params, graphdef, 0


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  """(config, workdir, video folder, captions {library file name: [captions]})."""
  root = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate_dataset(root, num_train=2, num_val=2, num_test=NUM_VIDEOS, size=32,
                             num_frames=8)
  config = demo.get_config("tiny,mode=t2v2t")
  config.data_root = root
  config.eval.k = 2  # the third result is past the rerank: its rerank score is null
  with open(os.path.join(root, "test.json")) as f:
    anno = json.load(f)
  folder = tmp_path_factory.mktemp("library")
  (folder / "sub").mkdir()
  names = ["a_plain.mp4", ODD_NAME, "sub/c_nested.mp4"]
  captions = {}
  for name, entry in zip(names, anno):
    shutil.copy(os.path.join(root, entry["video"]), folder / name)
    captions[name] = entry["caption"]
  workdir = str(tmp_path_factory.mktemp("run"))
  return config, workdir, str(folder), captions


@pytest.fixture(scope="module")
def server(library):
  """A server thread over one `Searcher` of the library; yields (base URL, app)."""
  config, workdir, folder, _ = library
  with pytest.MonkeyPatch.context() as mp:
    from t2v2t_jax.checkpoints import restore  # noqa: PLC0415
    mp.setattr(restore, "load_params", _random_params)
    searcher = Searcher(config, workdir, videos=folder, progress=False)
  app = serve_lib.SearchApp(searcher, default_top=NUM_VIDEOS)
  httpd = serve_lib.make_server(app, "127.0.0.1", 0)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd.url, app
  httpd.shutdown()
  httpd.server_close()
  app.close()
  thread.join(10)


def _get(url, path, headers=None):
  """(status, headers, body) of GET `path`."""
  parts = urllib.parse.urlsplit(url)
  conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
  try:
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()
  finally:
    conn.close()


def _query_path(query, top=NUM_VIDEOS, **more):
  return "/api/search?" + urllib.parse.urlencode({"q": query, "top": top, **more})


# ---------------------------------------------------------------------------------------
# HTTP


def test_search_api_is_the_engines_ranking(server, library):
  url, app = server
  _, _, folder, captions = library
  query = captions["sub/c_nested.mp4"][0]
  status, headers, body = _get(url, _query_path(query))
  assert status == 200 and headers["Content-Type"].startswith("application/json")
  assert "script-src 'self'" in headers["Content-Security-Policy"]
  data = json.loads(body)
  expected = app.searcher.search(query, top=NUM_VIDEOS)
  assert data["query"] == query and data["searched"] == NUM_VIDEOS and data["ms"] > 0
  got = data["results"]
  assert [r["video"] for r in got] == [r.video_index for r in expected]
  assert [r["rank"] for r in got] == [1, 2, 3]
  np.testing.assert_allclose([r["stage1"] for r in got], [r.stage1 for r in expected], atol=1e-6)
  np.testing.assert_allclose([r["rerank"] for r in got[:2]], [r.rerank for r in expected[:2]],
                             atol=1e-6)
  assert got[2]["rerank"] is None  # past the rerank's k = 2
  # Names relative to the library folder, exactly as on disk (markup and all).
  assert sorted(r["name"] for r in got) == sorted(captions)
  for r in got:
    assert r["path"] == os.path.join(folder, r["name"])
  # `top` limits the list; the default is the app's.
  assert len(json.loads(_get(url, _query_path(query, top=1))[2])["results"]) == 1
  assert len(json.loads(_get(url, "/api/search?q=" + urllib.parse.quote(query))[2])["results"]) \
      == NUM_VIDEOS


def test_refusals(server):
  url, _ = server
  for path, status, words in [
      ("/api/search?q=", 400, "empty query"),
      ("/api/search?q=%20%20", 400, "empty query"),
      ("/api/search", 400, "empty query"),
      (_query_path("a red circle", top=0), 400, "between 1 and"),
      (_query_path("a red circle", top=serve_lib.MAX_TOP + 1), 400, "between 1 and"),
      (_query_path("a red circle", top="two"), 400, "not a whole number"),
      ("/preview/3", 404, "the library has 3"),
      ("/preview/999999999", 404, "the library has 3"),
      ("/preview/-1", 404, "no such page"),
      ("/preview/0/../../etc/passwd", 404, "no such page"),
      ("/preview/%2e%2e%2fetc%2fpasswd", 404, "no such page"),
      ("/preview/abc", 404, "no such page"),
      ("/api/explain?q=x&top=3&video=7", 404, "the library has 3"),
      ("/api/explain?q=x&top=3&video=zero", 400, "not a library index"),
      ("/etc/passwd", 404, "no such page"),
  ]:
    got, headers, body = _get(url, path)
    assert got == status, (path, got, body)
    assert headers["Content-Type"].startswith("application/json"), path
    assert words in json.loads(body)["error"], (path, body)
  # A request for another host name (a DNS-rebinding page) is refused.
  port = urllib.parse.urlsplit(url).port
  got, _, body = _get(url, "/api/info", headers={"Host": f"evil.example:{port}"})
  assert got == 421
  assert _get(url, "/api/info", headers={"Host": f"localhost:{port}"})[0] == 200


def test_preview_is_the_sampled_frames(server, library):
  url, app = server
  status, headers, body = _get(url, "/preview/0")
  assert status == 200 and headers["Content-Type"] == "image/jpeg"
  strip = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.float32)
  frames, _ = video_decode.read_clip(app.paths[0], app.num_frames, "middle", None)
  t, h, w, _ = frames.shape
  width = round(w * serve_lib.PREVIEW_HEIGHT / h)
  assert strip.shape == (serve_lib.PREVIEW_HEIGHT, t * (width + serve_lib.PREVIEW_GAP)
                         - serve_lib.PREVIEW_GAP, 3)
  scale = serve_lib.PREVIEW_HEIGHT // h  # 32 px frames are enlarged 3x, nearest neighbour
  for i, frame in enumerate(frames):
    x = i * (width + serve_lib.PREVIEW_GAP)
    shown = strip[:, x:x + width][scale // 2::scale, scale // 2::scale]  # one pixel per source
    assert np.abs(shown - frame).mean() < 6  # JPEG's error only
  # Another video's strip differs (the index picks the video).
  other = np.asarray(Image.open(io.BytesIO(_get(url, "/preview/1")[2])).convert("RGB"), np.float32)
  assert other.shape == strip.shape and np.abs(other - strip).mean() > 5


def test_relevance_picture_api(server, library, monkeypatch):
  url, app = server
  _, _, _, captions = library
  query = captions["a_plain.mp4"][1]
  expected = app.searcher.search(query, top=NUM_VIDEOS)
  calls = []
  real_search = app.searcher.search

  def counting_search(*args, **kwargs):
    calls.append(kwargs.get("explain", False))
    return real_search(*args, **kwargs)

  monkeypatch.setattr(app.searcher, "search", counting_search)
  pictures = {}
  for r in expected:
    path = "/api/explain?" + urllib.parse.urlencode({"q": query, "top": NUM_VIDEOS,
                                                    "video": r.video_index})
    status, headers, body = _get(url, path)
    assert status == 200 and headers["Content-Type"] == "image/png", body[:200]
    pictures[r.video_index] = Image.open(io.BytesIO(body))
  assert calls == [True]  # one engine call drew all three; the other two were kept
  size = search_explain.PICTURE_MIN_FRAME_SIZE
  num_frames = app.searcher.index.num_frames
  for picture in pictures.values():
    assert picture.format == "PNG"
    assert picture.size == explain.picture_size(num_frames, size, size)
  # Each is the picture of its own video: the frames differ.
  a, b = (np.asarray(p.convert("RGB"), np.float32) for p in list(pictures.values())[:2])
  assert np.abs(a - b).mean() > 1
  # Not among the first `top` results: refused, not drawn.
  last = expected[-1].video_index
  status, _, body = _get(url, "/api/explain?" + urllib.parse.urlencode(
      {"q": query, "top": 1, "video": last}))
  assert status == 404 and "not among the first 1 results" in json.loads(body)["error"]
  # The user's own --explain folder is left alone.
  assert not os.path.exists(os.path.join(app.searcher.workdir, "search"))


def test_page_and_its_resources(server):
  url, _ = server
  status, headers, body = _get(url, "/")
  assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
  page = body.decode()
  assert '<input id="query"' in page and '<script src="/page.js"></script>' in page
  assert "<script>" not in page  # no inline script: the CSP forbids it
  assert _get(url, "/page.js")[1]["Content-Type"] == "text/javascript; charset=utf-8"
  assert _get(url, "/page.css")[1]["Content-Type"] == "text/css; charset=utf-8"
  info = json.loads(_get(url, "/api/info")[2])
  assert info["videos"] == NUM_VIDEOS and info["k"] == 2 and info["explain_unavailable"] is None
  assert info["default_top"] == NUM_VIDEOS


# ---------------------------------------------------------------------------------------
# The page in a real browser


class Chromium:
  """Headless Chromium driven through the DevTools protocol over a pipe: the browser
  reads commands from its fd 3 and writes replies and events to its fd 4, each a JSON
  object followed by a NUL byte."""

  def __init__(self, profile_dir, log_path, width=1200, height=1600):
    to_browser_r, self._to_browser = os.pipe()
    self._from_browser, from_browser_w = os.pipe()
    # Above 4, so that the shell's `3<&N 4>&M` cannot overwrite one with the other (bash:
    # dash takes no descriptor above 9).
    child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
    child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
    for fd in (to_browser_r, from_browser_w):
      os.close(fd)
    # --no-sandbox: Chromium's sandbox cannot start as root (tests run as root in CI).
    args = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
            "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--mute-audio",
            "--hide-scrollbars", f"--user-data-dir={profile_dir}",
            f"--window-size={width},{height}", "about:blank"]
    command = f"exec {shlex.join(args)} 3<&{child_r} 4>&{child_w}"
    self._log = open(log_path, "wb")
    self.proc = subprocess.Popen(["/bin/bash", "-c", command], pass_fds=(child_r, child_w),
                                 stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
    os.close(child_r)
    os.close(child_w)
    self._buffer = b""
    self._next_id = 0
    self.session = None
    target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    self.session = self.send("Target.attachToTarget", {"targetId": target,
                                                       "flatten": True})["sessionId"]
    self.send("Emulation.setDeviceMetricsOverride",
              {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

  def send(self, method, params=None, timeout=60):
    """The result of one command (events that arrive meanwhile are dropped)."""
    self._next_id += 1
    message = {"id": self._next_id, "method": method, "params": params or {}}
    if self.session:
      message["sessionId"] = self.session
    os.write(self._to_browser, json.dumps(message).encode() + b"\0")
    deadline = time.monotonic() + timeout
    while True:
      while b"\0" in self._buffer:
        raw, self._buffer = self._buffer.split(b"\0", 1)
        reply = json.loads(raw)
        if reply.get("id") == self._next_id:
          if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
          return reply["result"]
      left = deadline - time.monotonic()
      if left <= 0 or self.proc.poll() is not None:
        raise TimeoutError(f"{method}: no reply from Chromium (exit code {self.proc.poll()})")
      ready, _, _ = select.select([self._from_browser], [], [], left)
      if ready:
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
          raise RuntimeError(f"{method}: Chromium closed the pipe")
        self._buffer += chunk

  def navigate(self, url):
    """Opens `url` and waits until its document has loaded (`Page.navigate` returns
    before that)."""
    self.send("Page.navigate", {"url": url})
    self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
                  what=f"{url} to load")

  def evaluate(self, expression):
    """The value of a JavaScript expression in the page (awaited if it is a promise)."""
    result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                            "awaitPromise": True})
    if "exceptionDetails" in result:
      raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")

  def wait_for(self, expression, timeout=60, what=""):
    """Polls until `expression` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
      value = self.evaluate(expression)
      if value:
        return value
      if time.monotonic() > deadline:
        raise TimeoutError(f"waited {timeout} s for {what or expression}")
      time.sleep(0.02)

  def click(self, selector):
    """A real mouse click (press and release) at the middle of the element."""
    rect = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                         "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                         "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
      self.send("Input.dispatchMouseEvent", {"type": kind, "x": rect[0], "y": rect[1],
                                             "button": "left", "clickCount": 1})

  def type_and_enter(self, selector, text):
    self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
    self.send("Input.insertText", {"text": text})
    for kind in ("keyDown", "keyUp"):
      self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                           "windowsVirtualKeyCode": 13, "text": "\r"})

  def screenshot(self) -> Image.Image:
    data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

  def close(self):
    try:
      self.send("Browser.close", timeout=10)
    except (RuntimeError, TimeoutError, OSError):
      pass
    try:
      self.proc.wait(10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    os.close(self._to_browser)
    os.close(self._from_browser)
    self._log.close()


def _results_in_page(browser):
  return browser.evaluate(
      "[...document.querySelectorAll('#results > li')].map(li => ({"
      "video: Number(li.dataset.video), rank: Number(li.dataset.rank), "
      "name: li.querySelector('.name').textContent, "
      "stage1: li.querySelector('.stage1').textContent, "
      "rerank: li.querySelector('.rerank').textContent}))")


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_page_in_headless_chromium(server, library, tmp_path):
  url, app = server
  _, _, _, captions = library
  query = captions[ODD_NAME][0]
  expected = app.searcher.search(query, top=NUM_VIDEOS)  # the engine's own answer
  browser = Chromium(tmp_path / "profile", tmp_path / "chromium.log")
  try:
    browser.navigate(url)
    # The page has loaded the library's facts (the search waits for them too).
    browser.wait_for("document.getElementById('info').textContent.includes('checkpoint step')",
                     what="the page's /api/info line")
    started = time.perf_counter()
    browser.type_and_enter("#query", query)
    state = browser.wait_for("document.body.dataset.state === 'done' || "
                             "document.body.dataset.state === 'error' ? "
                             "document.body.dataset.state : ''", what="the results")
    page_ms = 1000 * (time.perf_counter() - started)
    status = browser.evaluate("document.getElementById('status').textContent")
    assert state == "done", status
    print(f"\npage query latency: {page_ms:.0f} ms from Enter to the list ({status})")

    # The list is the engine's ranking, with both stages' scores and every name as text.
    shown = _results_in_page(browser)
    assert [r["video"] for r in shown] == [r.video_index for r in expected]
    assert shown[0]["video"] == expected[0].video_index
    assert [r["rank"] for r in shown] == [1, 2, 3]
    for r, e in zip(shown, expected):
      assert r["name"] == os.path.relpath(e.path, library[2])
      assert r["stage1"] == f"stage 1: {e.stage1:.4f}"
      assert r["rerank"] == (f"rerank: {e.rerank:.4f}" if e.rerank is not None else "rerank: \u2014")
    assert ODD_NAME in [r["name"] for r in shown]
    assert browser.evaluate("document.querySelectorAll('#results b').length") == 0
    assert browser.evaluate("new URLSearchParams(location.search).get('q')") == query
    # Every preview loaded and decoded.
    browser.wait_for("[...document.querySelectorAll('#results img.preview')].every("
                     "i => i.complete && i.naturalWidth > 0)", what="the previews")

    # The relevance picture of the top result, on request.
    browser.click('#results > li[data-rank="1"] button.explain')
    size = browser.wait_for(
        "(() => { const i = document.querySelector('#results > li[data-rank=\"1\"] img.relevance');"
        " return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null;"
        " })()", what="the relevance picture")
    frame = search_explain.PICTURE_MIN_FRAME_SIZE
    assert tuple(size) == explain.picture_size(app.searcher.index.num_frames, frame, frame)
    # On screen: where the <img> shows its content, the screenshot is the server's PNG.
    box = browser.evaluate(
        "(() => { const i = document.querySelector('#results > li[data-rank=\"1\"] img.relevance');"
        " i.scrollIntoView({block: 'center'}); const r = i.getBoundingClientRect();"
        " return [r.left + i.clientLeft, r.top + i.clientTop, i.clientWidth, i.clientHeight]; })()")
    shot = browser.screenshot()
    shot.save(tmp_path / "page.png")
    _, _, png = _get(url, "/api/explain?" + urllib.parse.urlencode(
        {"q": query, "top": NUM_VIDEOS, "video": expected[0].video_index}))
    sent = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)
    assert (box[2], box[3]) == (sent.shape[1], sent.shape[0])  # drawn at its own size
    x, y = round(box[0]), round(box[1])
    shown = np.asarray(shot, np.float32)[y:y + sent.shape[0], x:x + sent.shape[1]]
    assert shown.shape == sent.shape
    assert np.abs(shown - sent).mean() < 2, "the picture on screen is not the server's"
    # ... and it is a picture, not a blank: the frames and both colours of the bars.
    assert (np.abs(shown - 255).sum(-1) > 30).mean() > 0.2
    for color in (explain.TEXT_COLOR, explain.OWN_COLOR):
      assert (np.abs(shown - color).max(-1) <= 3).sum() > 20, color

    # A query that is markup stays text.
    hostile = '<img src=x onerror="document.title=\'pwned\'">'
    browser.evaluate("document.getElementById('query').value = ''")
    browser.type_and_enter("#query", hostile)
    browser.wait_for("document.body.dataset.state === 'done' && "
                     "document.getElementById('status').textContent.includes('onerror')",
                     what="the second search")
    assert browser.evaluate("document.querySelectorAll('img:not(.preview):not(.relevance)')"
                            ".length") == 0
    assert browser.evaluate("document.title") == "Video search"
  finally:
    browser.close()


def test_serve_stops_on_ctrl_c(library, monkeypatch, capsys):
  """`serve` (what `--mode serve` runs): it prints its URL, answers, and Ctrl-C stops it
  cleanly, the SIGTERM handler given back."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signals reach only the main thread, and this test does not run in it")
  config, workdir, folder, captions = library
  from t2v2t_jax.checkpoints import restore  # noqa: PLC0415
  monkeypatch.setattr(restore, "load_params", _random_params)
  servers = []
  real_make_server = serve_lib.make_server

  def keep_server(*args, **kwargs):
    servers.append(real_make_server(*args, **kwargs))
    return servers[-1]

  monkeypatch.setattr(serve_lib, "make_server", keep_server)
  answers = []

  def client():
    # Wait for the engine to be ready, ask once, then press Ctrl-C.
    deadline = time.monotonic() + 300
    while not (servers and servers[0].app is not None) and time.monotonic() < deadline:
      time.sleep(0.05)
    try:
      answers.append(_get(servers[0].url, "/api/search?q="
                          + urllib.parse.quote(captions["a_plain.mp4"][0])))  # no top=
    finally:
      os.kill(os.getpid(), signal.SIGINT)

  before = signal.getsignal(signal.SIGTERM)
  # Ctrl-C as a terminal delivers it: SIGINT with Python's own handler. An earlier test in
  # this worker process may have left SIGINT ignored (a hang in one CI run), so set it here.
  previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
  thread = threading.Thread(target=client, daemon=True)
  thread.start()
  try:
    serve_lib.serve(config, workdir, videos=folder, port=0, top=2, progress=False)
  finally:
    signal.signal(signal.SIGINT, previous_int)
  thread.join(10)
  out = capsys.readouterr().out
  assert f"Serving {NUM_VIDEOS} videos" in out and servers[0].url in out
  assert "Stopping the server." in out
  assert answers and answers[0][0] == 200
  assert len(json.loads(answers[0][2])["results"]) == 2  # --top: the page's default
  assert signal.getsignal(signal.SIGTERM) is before
  # The socket is closed: nothing listens on the port any more.
  with pytest.raises(OSError):
    _get(servers[0].url, "/api/info")


def test_main_flags():
  """`--mode serve` is a mode of main.py, with a bounded `--port`: flag parsing accepts the
  mode and refuses the port, before any model is loaded."""
  import sys  # noqa: PLC0415
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bad_port = subprocess.run(
      [sys.executable, "main.py", "--mode", "serve", "--config", "configs/demo.py:tiny",
       "--workdir", "/nonexistent", "--port", "70000"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert bad_port.returncode != 0
  assert "flag --port=70000" in bad_port.stderr and "65535" in bad_port.stderr
  assert "--mode" not in bad_port.stderr  # 'serve' is a valid mode
