"""A generated video library searched on this CPU: the library index's figures (issue 27).

  python benchmarks/search_library.py                       # 10,000 videos, the demo model
  python benchmarks/search_library.py --videos 20 --work /tmp/lib20   # a quick check
  python benchmarks/search_library.py --paper_sample 4      # + paper-size figures, 4 videos

What it does, in order (every figure is printed and the last stdout line is a JSON object):
  1. generates `--videos` synthetic clips (`input_pipeline/synthetic.py`: 64 px, 16
     frames, x264) in folders of 1,000 (`part00/`, `part01/`, ...); kept for reruns;
  2. indexes them in a subprocess that is killed (SIGKILL) once `--kill_after` of them
     are committed, then counts the committed videos in the index;
  3. indexes again in this process: the videos it encodes are counted at the encoder
     (`RetrievalEvaluator._encoded_batches`), so "nothing committed is embedded again"
     is checked from outside the index's bookkeeping; throughput = videos / wall time
     of this pass (reading, decoding, encoding, committing, compiles included);
  4. adds 10 videos and refreshes: counts what is encoded;
  5. disk per video of the index (SQLite + stage-1 vectors), and of an index with stored
     float16 tokens (built over `part00/`, up to 1,000 videos);
  6. query latency over `--queries` synthetic captions after one warm-up query: stage 1
     (text encoder + dot products with every stage-1 vector + sort) and the rerank of
     the stage-1 top `--k` with tokens recomputed and with stored tokens;
  7. the content hash (first, middle and last MiB) against a hash of every byte on a
     file of `--hash_mib` MiB (read from the page cache: the hashing cost alone);
  8. `--paper_sample N`: the paper-size model (`configs/msrvtt_ft.py`: ViT-B/16 224 px,
     12 frames, BERT-base, random weights, float32 as search runs on a CPU): video
     embedding throughput on N videos (a small sample), and the rerank of k = 16
     candidates with stored tokens and with tokens recomputed.

The model's weights are random (`restore.load_params` is replaced): none of these figures
depends on what the weights are. The demo model: `configs/demo.py` (ViT width 128, 4
layers, 48 px, 4 frames; BERT width 128, 4 layers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# This CPU, whatever accelerator plugin is installed (set JAX_PLATFORMS to choose).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

PART = 1000  # videos a folder


def _render(job):
  from input_pipeline import synthetic  # noqa: PLC0415
  path, seed = job
  rng = np.random.default_rng(seed)
  spec = synthetic.random_spec(rng)
  synthetic.write_video(path, synthetic.render_video(spec, seed, size=64, num_frames=16))
  return path


def generate(folder: str, count: int, first_seed: int = 0, workers: int = 2) -> float:
  """`count` clips under `folder/partNN/` (those already there are kept); seconds spent."""
  jobs = []
  for i in range(count):
    path = os.path.join(folder, f"part{i // PART:02d}", f"{i:06d}.mp4")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      jobs.append((path, first_seed + i))
  start = time.perf_counter()
  if jobs:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      for n, _ in enumerate(pool.imap_unordered(_render, jobs, chunksize=32), 1):
        if n % 1000 == 0:
          print(f"  generated {n} of {len(jobs)}", flush=True)
  return time.perf_counter() - start


def demo_config(work: str, k: int, chunk: int):
  from configs import demo  # noqa: PLC0415
  from input_pipeline import synthetic  # noqa: PLC0415
  with open(os.path.join(work, "vocab.txt"), "w") as f:
    f.write("\n".join(synthetic.vocabulary()) + "\n")
  config = demo.get_config("")
  config.data_root = work
  config.eval.k = k
  # Batches no larger than a chunk, so that small runs commit more than one chunk.
  config.eval.video_batch_size = min(int(config.eval.video_batch_size), chunk)
  return config


def random_weights():
  """`restore.load_params` -> the model's initial (seeded, so reproducible) weights."""
  from flax import nnx  # noqa: PLC0415
  from t2v2t_jax.checkpoints import restore  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import create_model  # noqa: PLC0415
  made = {}

  def load(config, workdir, mesh, purpose="Evaluating"):
    key = config.model.to_json_best_effort()
    if key not in made:
      made[key] = nnx.split(create_model(config.model), nnx.Param)
    return made[key][1], made[key][0], 0

  restore.load_params = load


def index_only(args) -> None:
  """The subprocess of step 2: indexes the library and SIGKILLs itself (no handler, no
  cleanup runs) at the first batch encoded after `--kill_after` videos were committed,
  so that the chunk being filled is lost as in a kill from outside, at any library size
  (a kill timed from outside lands after the end on a 20-video library)."""
  random_weights()
  from t2v2t_jax.evaluation import search  # noqa: PLC0415
  from t2v2t_jax.evaluation.library_index import LibraryIndex  # noqa: PLC0415
  from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator  # noqa: PLC0415
  committed = [0]
  real_commit, real_batches = LibraryIndex.commit_chunk, RetrievalEvaluator._encoded_batches

  def commit(self, hashes, means, tokens, errors):
    committed[0] += len(hashes) + len(errors)
    return real_commit(self, hashes, means, tokens, errors)

  def batches(self, params, data, desc):
    for batch in real_batches(self, params, data, desc):
      if committed[0] >= args.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
      yield batch

  LibraryIndex.commit_chunk, RetrievalEvaluator._encoded_batches = commit, batches
  search.Searcher(demo_config(args.work, args.k, args.chunk), os.path.join(args.work, "run"),
                  videos=os.path.join(args.work, "library"), progress=False,
                  chunk_videos=args.chunk)


def committed_videos(work: str) -> int:
  """Videos the index records (embedded or unreadable), summed over its key folders."""
  total = 0
  root = os.path.join(work, "run", "search_library")
  for key in os.listdir(root) if os.path.isdir(root) else []:
    path = os.path.join(root, key, "index.sqlite")
    if os.path.exists(path):
      try:
        with sqlite3.connect(path, timeout=1) as db:
          total += db.execute("SELECT COUNT(*) FROM videos").fetchone()[0]
      except sqlite3.OperationalError:  # the tables are not created yet / locked
        pass
  return total


def kill_during_indexing(args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--_index_only", "--work", args.work,
         "--k", str(args.k), "--chunk", str(args.chunk), "--kill_after", str(args.kill_after)]
  start = time.perf_counter()
  proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
  if proc.returncode != -signal.SIGKILL:
    raise RuntimeError(f"the indexing subprocess was not killed (exit {proc.returncode}):\n"
                       + proc.stderr.decode()[-3000:])
  return dict(killed_after_s=round(time.perf_counter() - start, 1),
              committed_before_kill=committed_videos(args.work))


def folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def latency(searcher, queries, top: int) -> dict:
  """Median and 90th percentile (ms) of stage 1 and of the whole query, per query."""
  import numpy as np  # noqa: PLC0415
  searcher.search(queries[0], top=top)  # warm-up: the first query compiles
  stage1, whole = [], []
  for q in queries:
    t0 = time.perf_counter()
    text_emb, _, _ = searcher.embed_query(q)
    scores = searcher.stage1(text_emb)
    np.argsort(-scores, kind="stable")
    t1 = time.perf_counter()
    searcher.search(q, top=top)
    t2 = time.perf_counter()
    stage1.append((t1 - t0) * 1e3)
    whole.append((t2 - t1) * 1e3)
  rerank = [w - s for w, s in zip(whole, stage1)]

  def summary(xs):
    return dict(median_ms=round(statistics.median(xs), 2),
                p90_ms=round(float(np.percentile(xs, 90)), 2))
  return dict(stage1=summary(stage1), rerank=summary(rerank), query=summary(whole))


def captions(n: int, seed: int = 123) -> list[str]:
  from input_pipeline import synthetic  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  return [synthetic.caption(synthetic.random_spec(rng), synthetic.random_style(rng))
          for _ in range(n)]


def hash_speed(work: str, mib: int) -> dict:
  from t2v2t_jax.evaluation import library_index  # noqa: PLC0415
  path = os.path.join(work, "hash_probe.bin")
  with open(path, "wb") as f:
    block = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    for _ in range(mib):
      f.write(block)
  library_index.full_hash(path)  # into the page cache
  out = {}
  for name, fn in (("sampled", library_index.content_hash), ("full", library_index.full_hash)):
    times = []
    for _ in range(3):
      t = time.perf_counter()
      fn(path)
      times.append(time.perf_counter() - t)
    out[f"{name}_ms"] = round(min(times) * 1e3, 2)
  os.remove(path)
  out["file_mib"] = mib
  return out


def paper_sample(args) -> dict:
  """The paper-size model on a few videos: embedding throughput and the rerank of 16."""
  import jax  # noqa: PLC0415
  from configs import msrvtt_ft  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from t2v2t_jax import sharding as sharding_lib  # noqa: PLC0415
  from t2v2t_jax.evaluation import search_videos  # noqa: PLC0415
  from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator  # noqa: PLC0415
  from t2v2t_jax.evaluation.search import cpu_float32  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import create_model  # noqa: PLC0415
  config = cpu_float32(msrvtt_ft.get_config(""))
  t = time.perf_counter()
  graphdef, params = nnx.split(create_model(config.model), nnx.Param)
  init_s = time.perf_counter() - t
  mesh = sharding_lib.make_mesh(config.mesh)
  evaluator = RetrievalEvaluator(graphdef, mesh, k=16, rerank_batch_size=16, progress=False)
  n, frames_n, size = args.paper_sample, int(config.eval.num_frames), 224
  paths = sorted(search_videos.find_video_files(os.path.join(args.work, "library")))[:n]

  def encode(batch_paths):
    frames = np.stack([search_videos.read_frames(p, frames_n, size) for p in batch_paths])
    emb, tok = evaluator._encode_video(params, *evaluator._put(frames))  # noqa: SLF001
    return np.asarray(emb), np.asarray(tok)

  t = time.perf_counter()
  encode(paths[:1])  # compile at batch 1
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  tokens = [encode([p])[1] for p in paths]
  embed_s = time.perf_counter() - t
  tokens = np.concatenate(tokens)
  # The rerank of 16 candidates: stored tokens (the sample's, repeated) vs recomputed
  # (read + encode 16 videos, then the same scoring).
  cand = np.resize(np.arange(len(paths)), 16)
  store = tokens[cand]
  hidden = np.random.default_rng(0).normal(size=(1, 32, config.model.text.width)).astype(np.float32)
  mask = np.ones((1, 32), np.int32)
  pairs = np.stack([np.arange(16), np.zeros(16, int)], 1)
  evaluator.score_candidates(params, pairs, hidden, mask, store, progress=False)  # compile
  t = time.perf_counter()
  evaluator.score_candidates(params, pairs, hidden, mask, store, progress=False)
  score_s = time.perf_counter() - t
  per_video_s = embed_s / len(paths)
  return dict(model="configs/msrvtt_ft.py (ViT-B/16 224 px, BERT-base), random weights, float32",
              frames=frames_n, sample_videos=len(paths), init_s=round(init_s, 1),
              encoder_compile_s=round(compile_s, 1),
              embed_videos_per_s=round(len(paths) / embed_s, 3),
              rerank16_stored_s=round(score_s, 2),
              rerank16_recompute_s_estimate=round(score_s + 16 * per_video_s, 1),
              tokens_bytes_per_video=int(tokens[0].nbytes),
              devices=str(jax.devices()[0]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--videos", type=int, default=10_000)
  parser.add_argument("--work", default="/tmp/search_library_bench")
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--chunk", type=int, default=256, help="videos a committed chunk")
  parser.add_argument("--kill_after", type=int, default=None,
                      help="kill the first indexing once this many are committed "
                           "(default: a third of the library)")
  parser.add_argument("--queries", type=int, default=20)
  parser.add_argument("--hash_mib", type=int, default=256)
  parser.add_argument("--paper_sample", type=int, default=0)
  parser.add_argument("--fresh", action="store_true", help="delete the index first")
  parser.add_argument("--_index_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._index_only:
    index_only(args)
    return
  if args.kill_after is None:
    args.kill_after = max(1, args.videos // 3)
  args.chunk = min(args.chunk, max(1, args.videos // 4))
  os.makedirs(args.work, exist_ok=True)
  library = os.path.join(args.work, "library")
  run_dir = os.path.join(args.work, "run")
  if os.path.isdir(run_dir):  # every figure below is of a fresh index
    import shutil  # noqa: PLC0415
    shutil.rmtree(run_dir)
  added = os.path.join(library, "added_later")  # step 4's videos, from an earlier run
  if os.path.isdir(added):
    import shutil  # noqa: PLC0415
    shutil.rmtree(added)
  results: dict = {"videos": args.videos, "k": args.k, "chunk_videos": args.chunk,
                   "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
  print(f"Generating {args.videos} videos in {library} ...", flush=True)
  results["generate_s"] = round(generate(library, args.videos), 1)
  results["library_bytes_per_video"] = folder_bytes(library) // args.videos

  print("Indexing in a subprocess, killed part-way ...", flush=True)
  results.update(kill_during_indexing(args))

  random_weights()
  # Videos encoded: the index's own count (tests/test_search_library.py checks it against
  # the evaluator's batches).
  from t2v2t_jax.evaluation import search  # noqa: PLC0415
  from t2v2t_jax.evaluation.library_index import LibraryIndex  # noqa: PLC0415
  config = demo_config(args.work, args.k, args.chunk)
  print("Indexing again (resuming) ...", flush=True)
  t = time.perf_counter()
  searcher = search.Searcher(config, run_dir, videos=library, progress=False,
                             chunk_videos=args.chunk)
  resume_s = time.perf_counter() - t
  encoded = searcher.index.stats["embedded"]
  results.update(resumed_encoded=encoded,
                 resumed_expected=args.videos - results["committed_before_kill"],
                 resume_s=round(resume_s, 1),
                 embed_videos_per_s=round(encoded / resume_s, 1))
  t = time.perf_counter()
  stats = searcher.refresh()
  results["refresh_unchanged_s"] = round(time.perf_counter() - t, 2)
  results["refresh_unchanged_encoded"] = stats["embedded"]

  # Adding 10 videos: a new folder under the library.
  generate(os.path.join(library, "added_later"), 10, first_seed=10**6)
  t = time.perf_counter()
  stats = searcher.refresh()
  results.update(add10_encoded=stats["embedded"], add10_s=round(time.perf_counter() - t, 2),
                 add10_listed=stats["listed"])

  disk = LibraryIndex(searcher.index.cache_dir, {}, writer=False).disk_bytes()
  n_indexed = stats["listed"]
  results["disk_recompute"] = dict(
      total_bytes=sum(disk.values()), bytes_per_video=round(sum(disk.values()) / n_indexed, 1),
      **{f"{k}_bytes": v for k, v in disk.items()})

  queries = captions(args.queries)
  results["latency_recompute"] = latency(searcher, queries, args.k)

  # Stored float16 tokens, over part00/ (up to 1,000 videos).
  sample_dir = os.path.join(library, "part00")
  t = time.perf_counter()
  stored = search.Searcher(config, run_dir, videos=sample_dir, progress=False, tokens="float16",
                           chunk_videos=args.chunk)
  stored_s = time.perf_counter() - t
  n_sample = len(stored.index.paths)
  disk16 = LibraryIndex(stored.index.cache_dir, {}, writer=False).disk_bytes()
  results["disk_float16"] = dict(
      videos=n_sample, bytes_per_video=round(sum(disk16.values()) / n_sample, 1),
      tokens_bytes_per_video=round(disk16["tokens"] / n_sample, 1),
      embed_videos_per_s=round(stored.index.stats["embedded"] / stored_s, 1))
  results["latency_float16"] = latency(stored, queries, args.k)
  # The same queries on the same videos rank alike with either token source.
  sub = search.Searcher(config, run_dir, videos=sample_dir, progress=False)
  diffs = []
  for q in queries[:5]:
    a, b = stored.search(q, top=args.k), sub.search(q, top=args.k)
    assert [r.path for r in a] == [r.path for r in b], q
    diffs += [abs(x.rerank - y.rerank) for x, y in zip(a, b) if x.rerank is not None]
  results["float16_vs_recompute_max_rerank_diff"] = float(max(diffs)) if diffs else 0.0

  results["hash"] = hash_speed(args.work, args.hash_mib)
  if args.paper_sample:
    print(f"Paper-size model on {args.paper_sample} videos ...", flush=True)
    results["paper_sample"] = paper_sample(args)
  results["load_avg_end"] = os.getloadavg()[0]
  ok = (results["resumed_encoded"] == results["resumed_expected"]
        and results["add10_encoded"] == 10 and results["refresh_unchanged_encoded"] == 0)
  results["checks_pass"] = ok
  for key, value in results.items():
    print(f"{key}: {value}")
  print(json.dumps(results))
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  main()
