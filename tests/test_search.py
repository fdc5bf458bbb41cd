"""`--mode search`: ranking with a trained tiny checkpoint, the cache, the bypass picture.

The trained checkpoint: the tiny model (`configs/demo.py:tiny,mode=t2v2t`) learns to
tell apart three synthetic test videos from their six captions when it is trained on
exactly those pairs, full batch, VTC only, at a constant learning rate: the contrastive
loss reaches its floor (ln 2: each video has two captions in the batch) in about 120
steps (200 here). It does not learn the matching head in the seconds a test can spend
(VTM stays near chance for a few hundred steps), so the ranking test reranks only the
stage-1 top candidate (`eval.k = 1`: the rerank cannot reorder) and checks that every
caption finds its video; the reranking itself is checked against `RetrievalEvaluator`
(the evaluation code path, with its own frame reading and tokenization) with every
video reranked.
"""

import glob
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import demo
from input_pipeline import synthetic
from input_pipeline.config import corpus_config
from t2v2t_jax.evaluation import explain, search_explain, search_videos
from t2v2t_jax.evaluation import search as search_lib
from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator
from t2v2t_jax.models.t2v2t import similarity

NUM_VIDEOS = 3


def tiny_config(root, mode="t2v2t"):
  config = demo.get_config(f"tiny,mode={mode}")
  config.data_root = root
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir, test annotations): tiny t2v2t trained on the 3 test videos."""
  from t2v2t_jax.training import train  # noqa: PLC0415
  root = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate_dataset(root, num_train=2, num_val=2, num_test=NUM_VIDEOS, size=32,
                             num_frames=8, pair_fraction=0.0)
  config = tiny_config(root)
  config.data.train_corpora = [corpus_config("test_as_train", root + "/test.json", root)]
  config.batch_size = 2 * NUM_VIDEOS        # every pair in every batch
  config.total_steps = 200
  config.log_every = 50
  config.checkpoint_every = 1000
  config.optimizer.lr = config.optimizer.min_lr = 1e-3
  config.loss_weights.vtm = 0.0
  config.loss_weights.mlm = 0.0  # contrastive only: the loss bound below is for VTC
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(config, workdir, evaluate_at_end=False)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  final_loss = [r["loss"] for r in rows if "loss" in r][-1]
  # Chance is about ln 6 = 1.8, the floor ln 2 = 0.69.
  assert final_loss < 1.0, f"the tiny model did not learn: final loss {final_loss}"
  with open(os.path.join(root, "test.json")) as f:
    anno = json.load(f)
  assert len(anno) == NUM_VIDEOS
  return config, workdir, anno


# ---------------------------------------------------------------------------------------
# Ranking


def test_every_caption_finds_its_video(trained, capsys):
  config, workdir, anno = trained
  config = config.copy_and_resolve_references()
  config.eval.k = 1
  searcher = search_lib.Searcher(config, workdir, progress=False)
  for entry in anno:
    for caption in entry["caption"]:
      results = searcher.search(caption, top=NUM_VIDEOS)
      assert [r.rank for r in results] == [1, 2, 3]
      assert results[0].path.endswith(entry["video"]), (caption, [r.path for r in results])
      assert results[0].rerank is not None and all(r.rerank is None for r in results[1:])
      # Past the reranked top k, stage-1 order.
      assert results[1].stage1 >= results[2].stage1
  searcher.print_results(caption, results)
  out = capsys.readouterr().out.splitlines()
  assert out[-4].split() == ["rank", "path", "stage-1", "rerank"]
  fields = out[-3].split()
  assert fields[:2] == ["1", results[0].path] and fields[3] != "-"
  assert float(fields[2]) == pytest.approx(results[0].stage1, abs=1e-4)
  assert out[-1].split()[-1] == "-"  # not reranked


def test_rerank_scores_match_the_evaluator(trained):
  from input_pipeline import pipeline as pipeline_lib  # noqa: PLC0415
  from input_pipeline import text as text_lib  # noqa: PLC0415
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.eval.k = NUM_VIDEOS  # rerank every video
  searcher = search_lib.Searcher(config, workdir, progress=False)
  # The evaluation's own path: its frame reading, tokenization, embedding and scoring.
  data = pipeline_lib.make_eval_data(
      config.data.eval_corpora[0], tokenizer=text_lib.load_tokenizer(config.data.tokenizer),
      num_frames=config.eval.num_frames, image_size=config.model.vision.image_size,
      max_len=config.data.max_len, batch_size=1)
  evaluator = RetrievalEvaluator(searcher.graphdef, searcher.mesh, k=NUM_VIDEOS, progress=False)
  params = searcher.params
  video_emb, tokens = evaluator.embed_videos(params, data)
  text_emb, text_hidden = evaluator.embed_texts(params, data)
  for j in (0, 3):  # a caption of the first and of the second video
    pairs = np.stack([np.arange(NUM_VIDEOS), np.full(NUM_VIDEOS, j)], axis=1)
    itm = evaluator.score_candidates(params, pairs, text_hidden, data.attention_mask, tokens)
    stage1 = similarity(video_emb, text_emb[j:j + 1])[:, 0]
    results = searcher.search(data.texts[j], top=NUM_VIDEOS)
    order = [r.video_index for r in results]
    assert order == list(np.argsort(-itm, kind="stable"))
    np.testing.assert_allclose([r.rerank for r in results], itm[order], atol=1e-4)
    np.testing.assert_allclose([r.stage1 for r in results], stage1[order], atol=1e-5)


def test_rank_videos_reranks_only_the_top_k():
  stage1 = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
  # Stage-1 order: 1, 3, 2, 4, 0; the top 3 (1, 3, 2) get rerank scores in that order.
  order = search_lib.rank_videos(stage1, np.array([0.0, 2.0, 1.0]), k=3)
  assert order.tolist() == [3, 2, 1, 4, 0]
  # Ties keep stage-1 order.
  assert search_lib.rank_videos(stage1, np.zeros(3), k=3).tolist() == [1, 3, 2, 4, 0]


# ---------------------------------------------------------------------------------------
# The cache


def test_second_search_uses_the_index(trained, monkeypatch, tmp_path):
  config, workdir, anno = trained
  calls = []
  real_batches = RetrievalEvaluator._encoded_batches

  def counting_batches(self, params, data, desc):
    calls.append(data.num_videos)
    return real_batches(self, params, data, desc)

  monkeypatch.setattr(RetrievalEvaluator, "_encoded_batches", counting_batches)
  # The index is by content: the other tests' searches of the test split would make the
  # copies below free. Start from an empty one.
  shutil.rmtree(os.path.join(workdir, "search_library"), ignore_errors=True)
  # A folder of videos: two of the test videos, a file that is not a video (ignored) and
  # a broken video (recorded as unreadable, left out of the results).
  folder = tmp_path / "videos"
  folder.mkdir()
  for entry in anno[:2]:
    shutil.copy(os.path.join(config.data_root, entry["video"]), folder)
  (folder / "notes.txt").write_text("not a video")
  (folder / "broken.webm").write_bytes(b"not a webm file")
  first = search_lib.search(config, workdir, anno[0]["caption"][0], videos=str(folder),
                            progress=False)
  assert calls == [3]
  assert len(first) == 2 and not any(r.path.endswith("broken.webm") for r in first)
  indexes = glob.glob(os.path.join(workdir, "search_library", "*", "index.sqlite"))
  assert len(indexes) == 1
  second = search_lib.search(config, workdir, anno[1]["caption"][0], videos=str(folder),
                             progress=False)
  assert calls == [3]  # nothing embedded again, the broken file not retried
  assert sorted(r.path for r in first) == sorted(r.path for r in second)
  # A new video in the folder: only it is embedded.
  shutil.copy(os.path.join(config.data_root, anno[2]["video"]), folder / "extra.mp4")
  third = search_lib.search(config, workdir, anno[1]["caption"][0], videos=str(folder),
                            progress=False)
  assert calls == [3, 1] and len(third) == 3


def test_queries_file_answers_each_query_with_one_model_load(trained, tmp_path):
  """`main.py --mode search --queries FILE`: a table per query, the model loaded once."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  config, workdir, anno = trained
  queries = tmp_path / "queries.txt"
  queries.write_text(f"{anno[0]['caption'][0]}\n\n{anno[2]['caption'][1]}\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, os.path.join(repo, "main.py"), "--mode", "search",
       "--config", os.path.join(repo, "configs", "demo.py") + ":tiny,mode=t2v2t",
       f"--config.data_root={config.data_root}", "--config.eval.k=1", "--workdir", workdir,
       "--queries", str(queries), "--top", "2"],
      capture_output=True, text=True, timeout=300, cwd=repo, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert sum(line.startswith("Searching with") for line in lines) == 1
  assert "[query 1 of 2]" in out.stdout and "[query 2 of 2]" in out.stdout
  # Each table: its query's caption in the title, its video first.
  for i, entry in ((1, anno[0]), (2, anno[2])):
    at = next(n for n, line in enumerate(lines) if line.startswith(f"[query {i} of 2]"))
    assert lines[at + 1].startswith("Top 2 of 3 videos for")
    assert lines[at + 2].split() == ["rank", "path", "stage-1", "rerank"]
    assert lines[at + 3].split()[1].endswith(entry["video"]), lines[at:at + 5]


def test_folder_errors(tmp_path):
  config = tiny_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no such folder"):
    search_videos.list_videos(config, str(tmp_path / "missing"))
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="no video files"):
    search_videos.list_videos(config, str(tmp_path))
  for name in ("b.MKV", "a.webm", "c.avi", "d.mp4"):
    (tmp_path / name).write_bytes(b"")
  listed = search_videos.list_videos(config, str(tmp_path)).paths
  assert [os.path.basename(p) for p in listed] == ["a.webm", "b.MKV", "c.avi", "d.mp4"]


# ---------------------------------------------------------------------------------------
# The picture


def test_attention_shares_of_a_hand_made_array():
  # B=1, T=2 frames, H=2 heads, N=2 query tokens; L=3 text keys (the last one padding,
  # weight 0) then the frame's own 2 tokens: K=5.
  w = np.zeros((1, 2, 2, 2, 5))
  w[0, 0, 0, 0] = [0.5, 0.2, 0.0, 0.2, 0.1]    # 0.7 on the text
  w[0, 0, 0, 1] = [0.1, 0.1, 0.0, 0.4, 0.4]    # 0.2
  w[0, 0, 1, 0] = [1.0, 0.0, 0.0, 0.0, 0.0]    # 1.0
  w[0, 0, 1, 1] = [0.0, 0.0, 0.0, 0.5, 0.5]    # 0.0
  w[0, 1] = [0.25, 0.25, 0.0, 0.25, 0.25]      # 0.5 everywhere
  shares = explain.attention_shares(w, 3)
  assert shares.shape == (1, 2)
  np.testing.assert_allclose(shares, [[(0.7 + 0.2 + 1.0 + 0.0) / 4, 0.5]])
  # Naive T2V: the keys are the text alone, so all the attention is on the text.
  naive = np.full((2, 3, 2, 4, 3), 1 / 3)
  np.testing.assert_allclose(explain.attention_shares(naive, 3), np.ones((2, 3)))
  with pytest.raises(ValueError):
    explain.attention_shares(w[0], 3)
  with pytest.raises(ValueError):
    explain.attention_shares(w, 6)


def _bar_split(image, t, frame_height, frame_width):
  """(text pixels, own pixels, other pixels) along the middle row of frame t's bar."""
  pixels = np.asarray(image.convert("RGB"))
  y = explain.bar_top(frame_height) + explain.BAR_HEIGHT // 2
  x = explain.frame_left(t, frame_width)
  row = pixels[y, x:x + frame_width]
  text = int(np.all(row == explain.TEXT_COLOR, axis=-1).sum())
  own = int(np.all(row == explain.OWN_COLOR, axis=-1).sum())
  return text, own, frame_width - text - own


def test_picture_size_and_bars(tmp_path):
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
  shares = np.array([0.0, 0.3, 1.0])
  path = str(tmp_path / "out" / "1_video.png")
  explain.draw_explanation(frames, shares, "a red circle moves left", path, subtitle="#1 x.mp4")
  image = Image.open(path)
  assert image.format == "PNG"
  # width = T * W + (T + 1) * MARGIN; height = header (4 lines) + frame + bar + 2 label lines.
  m, line = explain.MARGIN, explain.LINE_HEIGHT
  assert (m, line, explain.GAP, explain.BAR_HEIGHT) == (8, 16, 4, 12)
  assert image.size == (3 * 48 + 4 * 8, 8 + 4 * 16 + 8 + 40 + 4 + 12 + 4 + 2 * 16 + 8)
  assert image.size == explain.picture_size(3, 40, 48) == (176, 180)
  # The frames are pasted unchanged.
  pixels = np.asarray(image.convert("RGB"))
  top = explain.bar_top(40) - explain.GAP - 40
  for t in range(3):
    x = explain.frame_left(t, 48)
    np.testing.assert_array_equal(pixels[top:top + 40, x:x + 48], frames[t])
  # Each bar: text part + own part = the whole frame width, in proportion to the share.
  for t, share in enumerate(shares):
    text, own, other = _bar_split(image, t, 40, 48)
    assert other == 0 and text + own == 48
    assert text == explain.text_pixels(share, 48) == round(share * 48)
  with pytest.raises(ValueError):
    explain.draw_explanation(frames, shares[:2], "q", None)


def test_explain_writes_a_picture_per_result(trained):
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  config, workdir, anno = trained
  caption = anno[1]["caption"][0]
  searcher = search_lib.Searcher(config, workdir, progress=False)
  results = searcher.search(caption, top=2, explain=True)
  pictures = sorted(glob.glob(os.path.join(workdir, "search", "*.png")))
  assert pictures == sorted(r.picture for r in results) and len(pictures) == 2
  for r in results:
    stem = os.path.splitext(os.path.basename(r.path))[0]
    assert os.path.basename(r.picture) == f"{r.rank}_{stem}.png"
  # Reference: the model's own calls, on frames read again, for each result.
  import jax  # noqa: PLC0415
  _, hidden, mask = searcher.embed_query(caption)
  num_frames, size = config.eval.num_frames, config.model.vision.image_size
  frames = np.stack([search_videos.read_frames(r.path, num_frames, size) for r in results])

  @jax.jit
  def reference(params, frames, hidden, mask):
    model = nnx.merge(searcher.graphdef, params)
    _, tokens = model.encode_video(frames)
    tokens = tokens.astype(jnp.float16).astype(jnp.float32)  # cached as float16
    fused, aux = model.fuse(hidden, mask, tokens, return_aux=True)
    (weights,) = aux["t2v_attention"]  # one T2V block ('once')
    return weights, model.itm_logits(fused)[:, 1]

  weights, itm = reference(searcher.params, frames, np.repeat(hidden, 2, 0), np.repeat(mask, 2, 0))
  shares = explain.attention_shares(np.asarray(weights), hidden.shape[1])
  assert shares.shape == (2, num_frames)
  assert np.all((shares >= 0) & (shares <= 1))
  assert 0 < shares.min() and shares.max() < 1  # the bypass takes part of the attention
  np.testing.assert_allclose(np.asarray(itm), [r.rerank for r in results], atol=1e-3)
  display = search_explain.PICTURE_MIN_FRAME_SIZE  # the 32 px frames are drawn 4x larger
  for r, share in zip(results, shares):
    image = Image.open(r.picture)
    assert image.size == explain.picture_size(num_frames, display, display)
    for t in range(num_frames):
      text, own, other = _bar_split(image, t, display, display)
      assert other == 0 and text + own == display
      assert abs(text - share[t] * display) <= 1


def test_naive_attention_is_all_on_the_text(tmp_path):
  from flax import nnx  # noqa: PLC0415
  from t2v2t_jax import sharding as sharding_lib  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import create_model  # noqa: PLC0415
  config = tiny_config(str(tmp_path), mode="t2v2t_naive")
  graphdef, params = nnx.split(create_model(config.model), nnx.Param)
  mesh = sharding_lib.make_mesh(config.mesh)
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(1, 6, config.model.text.width)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
  n = (config.model.vision.image_size // config.model.vision.patch_size) ** 2 + 1
  tokens = rng.normal(size=(2, 2, n, config.model.vision.width)).astype(np.float16)
  shares, _ = search_explain.text_shares(search_explain.attention_fn(graphdef), params, mesh,
                                         hidden, mask, tokens)
  np.testing.assert_allclose(shares, np.ones((2, 2)), atol=1e-6)


def test_explain_needs_a_t2v_mode(tmp_path, monkeypatch, capsys):
  """v2t has no T2V block: --explain says so and draws nothing; the search still runs."""
  from flax import nnx  # noqa: PLC0415
  from t2v2t_jax.checkpoints import restore  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import create_model  # noqa: PLC0415
  root = str(tmp_path / "data")
  synthetic.generate_dataset(root, num_train=2, num_val=2, num_test=2, size=32, num_frames=8)
  config = tiny_config(root, mode="v2t")

  def random_params(config, workdir, mesh, purpose="Evaluating"):
    graphdef, params = nnx.split(create_model(config.model), nnx.Param)
    return params, graphdef, 0

  monkeypatch.setattr(restore, "load_params", random_params)
  workdir = str(tmp_path / "run")
  results = search_lib.search(config, workdir, "a red circle appears", top=2, explain=True,
                              progress=False)
  assert len(results) == 2 and all(r.picture is None for r in results)
  assert "fusion mode 'v2t' has no T2V block" in capsys.readouterr().out
  assert not os.path.exists(os.path.join(workdir, "search"))
