"""The page that `--mode serve` sends: HTML, CSS and JavaScript as three strings.

They are Python strings rather than package data so that an editable install, a wheel and
a source checkout all find them without a `package-data` entry. The script and the style
are separate resources (`/page.js`, `/page.css`) so that the server's Content-Security-Policy
can forbid inline scripts: a query or a file name that reached the page as markup could
not run anyway. The script still inserts every server-supplied string with `textContent`
(never `innerHTML`), so none is ever parsed as markup in the first place.

Hooks the browser test reads: `document.body.dataset.state` ('idle', 'searching', 'done',
'error'), each result `<li>`'s `data-video` (the library index) and `data-rank`, and the
relevance picture `<img class="relevance">` inside its result.
"""

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Video search</title>
<link rel="stylesheet" href="/page.css">
</head>
<body data-state="idle">
<header>
  <h1>Video search</h1>
  <p id="info">Loading the library&hellip;</p>
</header>
<form id="search-form" role="search" autocomplete="off">
  <input id="query" name="q" type="search" placeholder="Describe the video you are looking for"
         aria-label="Query" required autofocus>
  <label for="top">Top</label>
  <input id="top" name="top" type="number" min="1" value="10">
  <button id="go" type="submit">Search</button>
</form>
<p id="status" role="status" aria-live="polite"></p>
<ol id="results"></ol>
<script src="/page.js"></script>
</body>
</html>
"""

CSS = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 16px;
       color: #222; background: #fff; }
header h1 { margin: 16px 0 0; font-size: 22px; }
#info { color: #666; margin: 4px 0 12px; }
form { display: flex; gap: 8px; align-items: center; }
#query { flex: 1; font-size: 16px; padding: 6px 8px; }
#top { width: 4em; padding: 6px; }
button { padding: 6px 14px; font-size: 15px; cursor: pointer; }
#status { color: #444; min-height: 1.4em; }
body[data-state="error"] #status { color: #b00020; }
#results { list-style: none; padding: 0; }
#results > li { border-top: 1px solid #ddd; padding: 10px 0; display: grid;
                grid-template-columns: 3em 1fr; column-gap: 8px; }
.rank { font-size: 20px; font-weight: 600; color: #555; }
.name { font-weight: 600; overflow-wrap: anywhere; }
.path { color: #777; font-size: 12px; overflow-wrap: anywhere; }
.scores { font-variant-numeric: tabular-nums; margin: 2px 0 6px; }
.scores span { margin-right: 1.5em; }
.preview { display: block; max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
.explain { margin-top: 6px; }
.relevance { display: block; margin-top: 6px; border: 1px solid #ccc; }
.note { color: #777; font-size: 13px; }
.note.error { color: #b00020; }
"""

JS = r"""
'use strict';
(function () {
  const form = document.getElementById('search-form');
  const queryBox = document.getElementById('query');
  const topBox = document.getElementById('top');
  const statusLine = document.getElementById('status');
  const list = document.getElementById('results');
  const info = document.getElementById('info');
  let explainReason = null;   // why the model has no relevance picture (null: it has one)
  let latest = 0;             // only the newest search may fill the list

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;   // text, never markup
    return node;
  }

  function setState(state, message) {
    document.body.dataset.state = state;
    statusLine.textContent = message;
  }

  async function errorMessage(response) {
    try { return (await response.json()).error || response.statusText; }
    catch (e) { return response.status + ' ' + response.statusText; }
  }

  const start = new URLSearchParams(location.search);
  // Searches wait for the library's facts: whether to offer the relevance picture.
  const ready = fetch('/api/info').then(r => r.json()).then(d => {
    explainReason = d.explain_unavailable;
    topBox.max = d.max_top;
    if (!start.get('top')) topBox.value = d.default_top;
    info.textContent = d.videos + ' videos (' + d.source + '), checkpoint step ' + d.step +
      '; stage 1 ranks every video, the rerank the first ' + d.k + '.';
  }).catch(() => { info.textContent = 'The server did not answer /api/info.'; });

  function score(value) { return value === null ? '\u2014' : value.toFixed(4); }

  function showPicture(item, query, top, video, button) {
    const old = item.querySelector('.relevance, .explain-note');
    if (old) {
      if (old.src) URL.revokeObjectURL(old.src);   // the picture's bytes can go
      old.remove();
      button.textContent = 'Relevance picture';
      return;
    }
    const note = el('p', 'note explain-note', 'Computing the relevance picture\u2026');
    item.querySelector('.body').appendChild(note);
    button.disabled = true;   // one request at a time for this result
    const url = '/api/explain?' + new URLSearchParams({q: query, top: String(top),
                                                      video: String(video)});
    fetch(url).then(async response => {
      if (!response.ok) throw new Error(await errorMessage(response));
      return response.blob();
    }).then(blob => {
      const img = el('img', 'relevance');
      img.alt = 'Relevance picture: the frames and how their attention split between the ' +
                'query and their own tokens';
      img.onload = () => { note.remove(); };
      img.src = URL.createObjectURL(blob);
      item.querySelector('.body').appendChild(img);
      button.textContent = 'Hide the relevance picture';
    }).catch(e => { note.textContent = 'No relevance picture: ' + e.message;
                    note.classList.add('error'); })
      .finally(() => { button.disabled = false; });
  }

  function render(data, top) {
    list.replaceChildren();
    for (const r of data.results) {
      const item = el('li');
      item.dataset.video = String(r.video);
      item.dataset.rank = String(r.rank);
      item.appendChild(el('div', 'rank', String(r.rank)));
      const body = el('div', 'body');
      body.appendChild(el('div', 'name', r.name));
      body.appendChild(el('div', 'path', r.path));
      const scores = el('div', 'scores');
      scores.appendChild(el('span', 'stage1', 'stage 1: ' + score(r.stage1)));
      scores.appendChild(el('span', 'rerank', 'rerank: ' + score(r.rerank)));
      body.appendChild(scores);
      const preview = el('img', 'preview');
      preview.alt = 'Frames of ' + r.name;
      preview.src = '/preview/' + r.video;
      body.appendChild(preview);
      if (explainReason === null) {
        const button = el('button', 'explain', 'Relevance picture');
        button.type = 'button';
        button.addEventListener('click', () => showPicture(item, data.query, top, r.video, button));
        body.appendChild(button);
      }
      item.appendChild(body);
      list.appendChild(item);
    }
  }

  async function search(query, top) {
    const mine = ++latest;
    setState('searching', 'Searching\u2026');
    const started = performance.now();
    try {
      await ready;
      const response = await fetch('/api/search?' + new URLSearchParams({q: query, top: String(top)}));
      if (!response.ok) throw new Error(await errorMessage(response));
      const data = await response.json();
      if (mine !== latest) return;
      render(data, data.top);
      const total = Math.round(performance.now() - started);
      setState('done', 'Top ' + data.results.length + ' of ' + data.searched + ' videos for \u201c' +
               data.query + '\u201d: ' + data.ms.toFixed(0) + ' ms in the engine, ' + total +
               ' ms in all.');
    } catch (e) {
      if (mine !== latest) return;
      list.replaceChildren();
      setState('error', 'Search failed: ' + e.message);
    }
  }

  form.addEventListener('submit', event => {
    event.preventDefault();
    const query = queryBox.value.trim();
    if (!query) return;
    const top = parseInt(topBox.value, 10) || 10;
    // The query goes into the address so that a reload or a shared link repeats it.
    history.replaceState(null, '', '?' + new URLSearchParams({q: query, top: String(top)}));
    search(query, top);
  });

  if (start.get('q')) {
    queryBox.value = start.get('q');
    if (start.get('top')) topBox.value = start.get('top');
    form.requestSubmit();
  }
})();
"""
