"""Benchmark of stage-2 reranking (fusion encoder + ITM head on candidate pairs), per mode.

For each fusion mode and each dataset shape asked for, this measures:
  - device throughput: `RetrievalEvaluator`'s own jitted pair scorer on device-resident
    random inputs (text states [P, L, D], text mask, the batch's distinct videos' float16
    tokens [U, T, N, D] and each slot's index into them; U = the videos a real batch
    spans, 2 at k = 128), P = --rerank-batch pairs a call; median of --steps blocked
    calls -> pairs/s (in 'v2t' a slot of up to 32 texts shares its video's
    cross-attention keys and values: the FLOPs computed a pair are fewer than the
    per-pair count; a video's last slot is part padding, not counted here);
  - host path: `RetrievalEvaluator.score_candidates` on a host float16 token store (it
    sends each batch's distinct videos' tokens once, with the pairs' text states), for
    --host-batches batches of pairs laid out as a real evaluation's (each video has about
    2k candidate pairs) -> pairs/s including the host gathers and the transfers, and the
    bytes sent per pair;
  - the compiled device memory of one scoring call, and analytic FLOPs per pair;
and projects the full evaluation of the dataset: candidate pairs (union of the text->video
and video->text top-k; counted with the evaluation's own `metrics.candidate_pairs` on a
simulated iid similarity matrix, and bounded by [max(Nt, Nv) k, (Nt + Nv) k]), time at the device
rate and at the host-path rate, host memory (float16 video tokens, text states,
similarity matrices) and host->device bytes.

Datasets (SPEC 5-7): msrvtt 1,000 texts x 1,000 videos, 12 frames, 32 tokens;
didemo 1,004 x 1,004 paragraphs, 12 frames, 64 tokens; anet 4,917 paragraphs x 4,917
videos, 32 frames, 64 tokens; k = 128.

--bounded: disk and memory of a whole evaluation per `eval.token_cache` ('memory', 'disk',
'recompute'), on an ActivityNet-like corpus scaled down (synthetic videos generated once
into --bounded-dir, paragraph texts, many frames, 224 px so 197 tokens a frame; a narrow
one-layer video encoder so that it runs on a CPU). Each cache runs in a process of its
own: peak RSS (VmHWM; RssAnon and RssFile sampled every 20 ms), the bytes of the files
the evaluation writes, stage-1 and rerank wall time, and the metrics (which must agree).
The paper-size figures follow from the per-token bytes and `flops.py`.

Examples:
  python benchmarks/eval_rerank.py                          # test size on the CPU
  python benchmarks/eval_rerank.py --preset paper --datasets msrvtt,anet --modes t2v2t,v2t
  python benchmarks/eval_rerank.py --bounded --bounded-videos 240 --bounded-frames 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

# The repository root first: `benchmarks/input_pipeline.py` must not shadow the
# `input_pipeline` package (Python puts this script's folder first on the path).
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT, _HERE] + [p for p in sys.path
                                if os.path.abspath(p or ".") not in (_ROOT, _HERE)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flops as flops_lib  # noqa: E402
import train_step as common  # noqa: E402

# name: (texts, videos, inference frames, text tokens)
DATASETS = {
    "msrvtt": (1000, 1000, 12, 32),
    "didemo": (1004, 1004, 12, 64),
    "anet": (4917, 4917, 32, 64),
}


_PAIR_COUNTS: dict = {}


def simulated_pair_count(evaluator, n_texts: int, n_videos: int, seed: int = 0) -> int:
  """Union of both directions' top-k on an iid similarity matrix (the evaluator's code).

  A pair with a high score tends to be in the top-k of its row and of its column, so even
  iid scores give a union close to the lower bound max(Nt, Nv) * k (MSR-VTT: ~134k of
  128k..256k); a trained model's similarity matrix behaves alike.
  """
  cache_key = (n_texts, n_videos, evaluator.k, seed)
  if cache_key in _PAIR_COUNTS:
    return _PAIR_COUNTS[cache_key]
  rng = np.random.default_rng(seed)
  sim = rng.standard_normal((n_videos, n_texts), dtype=np.float32)
  from t2v2t_jax.evaluation import metrics  # noqa: PLC0415
  pairs, _, _ = metrics.candidate_pairs(sim, evaluator.k)
  _PAIR_COUNTS[cache_key] = int(len(pairs))
  return _PAIR_COUNTS[cache_key]


def host_memory(n_texts, n_videos, frames, tokens, dv, text_len, dt, embed_dim, text_itemsize):
  video_tokens = n_videos * frames * tokens * dv * 2          # float16 token store
  text_states = n_texts * text_len * dt * text_itemsize
  video_emb = n_videos * frames * embed_dim * 4
  sims = 3 * n_videos * n_texts * 4                            # sim, t2v, v2t float32
  return {"video_tokens_bytes": video_tokens, "text_states_bytes": text_states,
          "video_emb_bytes": video_emb, "similarity_bytes": sims,
          "host_total_bytes": video_tokens + text_states + video_emb + sims}


def bench_one(args, mode: str, dataset: str, mesh, counter) -> dict:
  from flax import nnx  # noqa: PLC0415

  from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import create_model  # noqa: PLC0415
  from t2v2t_jax import sharding as sharding_lib  # noqa: PLC0415

  n_texts, n_videos, frames, text_len = DATASETS[dataset]
  if args.frames_override:
    frames = args.frames_override
  if args.text_len_override:
    text_len = args.text_len_override
  a = argparse.Namespace(**vars(args))
  a.mode, a.frames, a.text_len = mode, frames, text_len
  # The stored temporal embedding stays at the preset's training frames: evaluation
  # interpolates it to `frames`, as a fine-tuned checkpoint is evaluated.
  cfg = common.build_model_config(a)
  cfg.vision.num_frames = int(args.frames)
  sizes = flops_lib.Sizes.from_config(cfg, frames=frames, text_len=text_len)
  n_tok = sizes.fusion_tokens_per_frame
  dt, dv = cfg.text.width, cfg.vision.width
  pair_flops = flops_lib.rerank_per_pair(sizes)
  parts = flops_lib.fusion_forward(sizes)
  video_only_share = parts.get("cross_video_kv", 0) / pair_flops

  result = {"benchmark": "eval_rerank", **common.device_summary(), "preset": args.preset,
            "mode": mode, "dataset": dataset, "frames": frames, "text_len": text_len,
            "tokens_per_frame": n_tok, "dtype": cfg.dtype, "config": common.describe_config(cfg, a),
            "rerank_batch": args.rerank_batch, "analytic_flops_per_pair": pair_flops,
            "video_only_kv_share": video_only_share, "load_before": common.load_str()}
  print(f"[eval_rerank] {dataset} / {mode}: {result['config']}; {common.load_str()}", flush=True)

  if args.init == "real":
    graphdef, params = nnx.split(create_model(cfg), nnx.Param)
  else:  # host-drawn values (see train_step.synthetic_params): no initialiser kernels
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(cfg)), nnx.Param)
    params = common.synthetic_params(abstract)
  params = jax.device_put(params, sharding_lib.replicated(mesh))
  evaluator = RetrievalEvaluator(graphdef, mesh, k=args.k, rerank_batch_size=args.rerank_batch,
                                 progress=False)
  p = evaluator.rerank_batch_size
  compute_dtype = jnp.dtype(cfg.dtype)
  text_itemsize = compute_dtype.itemsize  # encode_text returns states in the compute dtype

  # Device-resident random inputs of one scoring call.
  sh = sharding_lib.batch_sharding(mesh)

  # The distinct videos of a call, as in a real evaluation: each video has about 2k
  # candidate pairs (k as a query's candidate, k as a candidate of other queries), sorted
  # by video, so a batch of p pairs spans 1 + ceil((p - 1) / 2k) videos when it straddles
  # a boundary (2 at k = 128, p = 128); sent padded to a power of two, as score_candidates
  # sends them. In 'v2t' the texts come in slots of `texts_per_slot` sharing a video's
  # keys and values (one projection per slot).
  per_video = max(1, 2 * min(args.k, n_videos))
  nu = args.videos_per_call or min(evaluator.videos_per_batch, 1 + -(-(p - 1) // per_video))
  nu_sent = evaluator.videos_sent(nu)
  k_slot = evaluator.texts_per_slot(mode)
  n_slots = p // k_slot
  kv = parts.get("cross_video_kv", 0)
  result.update(videos_per_call=nu, videos_sent_per_call=nu_sent, texts_per_slot=k_slot,
                computed_flops_per_pair=pair_flops - kv + kv / k_slot)

  def make(key):
    k1, k2, k3 = jax.random.split(key, 3)
    th = jax.random.normal(k1, (p, text_len, dt), jnp.float32).astype(compute_dtype)
    lengths = jax.random.randint(k2, (p,), max(2, text_len // 2), text_len + 1)
    tm = (jnp.arange(text_len)[None] < lengths[:, None]).astype(jnp.int32)
    vt = jax.random.normal(k3, (nu_sent, frames, n_tok, dv), jnp.float32).astype(jnp.float16)
    slot_video = (jnp.arange(n_slots) * nu // n_slots).astype(jnp.int32)   # nu videos in use
    return th, tm, vt, slot_video

  inputs = jax.jit(make, out_shardings=(sh, sh, sharding_lib.replicated(mesh), sh))(
      jax.random.key(0))
  jax.block_until_ready(inputs)

  score = evaluator._score_pairs  # the evaluator's jitted scorer  # noqa: SLF001
  t0 = time.perf_counter()
  compiled = score.lower(params, *inputs).compile()
  result["compile_s"] = time.perf_counter() - t0
  result.update(common.memory_summary(compiled))
  xla = common.cost_flops(compiled)
  result["xla_flops_per_pair"] = None if xla is None else xla * mesh.size / p
  del compiled
  limit = common.device_memory_stats()["device_bytes_limit"]
  if limit and result["compiled_total_bytes"] and result["compiled_total_bytes"] > limit:
    result["status"] = "does_not_fit"
    return result

  # --slot-baseline: the same scorer with a slot per pair (each text its own copy of the
  # video: the layout before 'v2t' slots), on the same inputs, timed in alternation.
  variants = [("slots", inputs)]
  if args.slot_baseline and k_slot > 1:
    per_pair = jax.device_put((jnp.arange(p) * nu // p).astype(jnp.int32), sh)
    variants.append(("slot_per_pair", inputs[:3] + (per_pair,)))
  for _, args_ in variants:
    for _ in range(2):
      jax.block_until_ready(score(params, *args_))
  compiles = counter.count
  all_times = {name: [] for name, _ in variants}
  for _ in range(args.steps):
    for name, args_ in variants:
      t0 = time.perf_counter()
      jax.block_until_ready(score(params, *args_))
      all_times[name].append(time.perf_counter() - t0)
  times = all_times["slots"]
  if "slot_per_pair" in all_times:
    result["slot_per_pair_call_s_median"] = statistics.median(all_times["slot_per_pair"])
    result["slots_speedup"] = result["slot_per_pair_call_s_median"] / statistics.median(times)
  result["recompiles"] = counter.count - compiles
  med = statistics.median(times)
  result["call_s_median"] = med
  result["device_pairs_per_s"] = p / med
  # On the FLOPs the scorer computes (in 'v2t' a video's keys and values once a slot).
  result["model_tflops_per_device"] = result["computed_flops_per_pair"] * p / med / mesh.size / 1e12
  peak, peak_note = common.peak_tflops_per_device(cfg.dtype)
  result["peak_tflops_per_device"], result["peak_source"] = peak, peak_note
  result["mfu"] = result["model_tflops_per_device"] / peak if peak else None
  result.update(common.device_memory_stats())

  # Host path: the evaluator's score_candidates over a small host token store.
  if args.host_batches > 0:
    n_store = max(1, min(16, args.host_batches * p // 8))
    rng = np.random.default_rng(0)
    store = rng.standard_normal((n_store, frames, n_tok, dv), dtype=np.float32).astype(np.float16)
    n_text_store = 64
    th_host = np.asarray(rng.standard_normal((n_text_store, text_len, dt), dtype=np.float32)
                         ).astype(np.asarray(jnp.zeros((), compute_dtype)).dtype)
    tm_host = np.ones((n_text_store, text_len), np.int32)
    n_pairs = p * (args.host_batches + 1)
    vids = (np.arange(n_pairs) // per_video) % n_store
    txts = rng.integers(0, n_text_store, n_pairs)
    pairs = np.stack([vids, txts], 1)
    evaluator.score_candidates(params, pairs[:p], th_host, tm_host, store)  # warm
    t0 = time.perf_counter()
    evaluator.score_candidates(params, pairs[p:], th_host, tm_host, store)
    host_s = time.perf_counter() - t0
    stats = evaluator.transfer_stats
    result["host_path_pairs_per_s"] = (n_pairs - p) / host_s
    result["host_bytes_per_pair"] = (stats["video_bytes"] + stats["text_bytes"]) / stats["pairs"]
    result["host_bytes_per_pair_per_pair_copy"] = (frames * n_tok * dv * 2
                                                   + text_len * dt * th_host.itemsize)

  # Projection of the full evaluation.
  pairs_sim = simulated_pair_count(evaluator, n_texts, n_videos)
  k_t2v, k_v2t = min(args.k, n_videos), min(args.k, n_texts)
  result.update(
      eval_texts=n_texts, eval_videos=n_videos, k=args.k, pairs_simulated_iid=pairs_sim,
      pairs_lower_bound=max(n_texts * k_t2v, n_videos * k_v2t),
      pairs_upper_bound=n_texts * k_t2v + n_videos * k_v2t)
  result["projected_rerank_s_device"] = pairs_sim / result["device_pairs_per_s"]
  if "host_path_pairs_per_s" in result:
    result["projected_rerank_s_host_path"] = pairs_sim / result["host_path_pairs_per_s"]
    result["projected_host_to_device_bytes"] = pairs_sim * result["host_bytes_per_pair"]
  result.update(host_memory(n_texts, n_videos, frames, n_tok, dv, text_len, dt, cfg.embed_dim,
                            text_itemsize))
  result["load_after"] = common.load_str()
  result["status"] = "ok" if result["recompiles"] == 0 else "recompiled"
  return result


def report(r: dict) -> None:
  if r.get("status") not in ("ok", "recompiled"):
    print(f"[eval_rerank] {r.get('dataset')} / {r.get('mode')}: {r.get('status')} "
          f"{r.get('error', '')[:300]}", flush=True)
    return
  host = r.get("host_path_pairs_per_s")
  host_s = "n/a" if host is None else f"{host:,.0f} pairs/s"
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  print(f"[eval_rerank] {r['dataset']} / {r['mode']}: {r['device_pairs_per_s']:,.1f} pairs/s on "
        f"the device (batch {r['rerank_batch']}, {r['call_s_median'] * 1e3:.1f} ms a call, "
        f"{r['videos_per_call']} video(s), {r['texts_per_slot']} text(s) a slot, "
        f"{r['computed_flops_per_pair'] / 1e9:.3f} of "
        f"{r['analytic_flops_per_pair'] / 1e9:.3f} GFLOPs/pair computed, "
        f"{r['model_tflops_per_device']:.3f} "
        f"TFLOP/s, MFU {mfu}); host path {host_s}; compiled memory "
        f"{common.gib(r['compiled_total_bytes'])}", flush=True)
  if "slots_speedup" in r:
    print(f"[eval_rerank]   slot per pair (before): {r['slot_per_pair_call_s_median'] * 1e3:.1f} ms "
          f"a call; slots of {r['texts_per_slot']}: {r['slots_speedup']:.2f}x faster", flush=True)
  print(f"[eval_rerank]   full {r['dataset']} ({r['eval_texts']} x {r['eval_videos']}, k {r['k']}, "
        f"{r['frames']} frames): {r['pairs_simulated_iid']:,} pairs (bounds "
        f"{r['pairs_lower_bound']:,}..{r['pairs_upper_bound']:,}) -> "
        f"{r['projected_rerank_s_device']:,.0f} s at the device rate"
        + (f", {r['projected_rerank_s_host_path']:,.0f} s on the host path "
           f"({r['projected_host_to_device_bytes'] / 1e9:,.0f} GB host->device)"
           if "projected_rerank_s_host_path" in r else "")
        + f"; host memory: video tokens {common.gib(r['video_tokens_bytes'])} (float16), text "
        f"states {common.gib(r['text_states_bytes'])}, similarity matrices "
        f"{common.gib(r['similarity_bytes'])}", flush=True)


# -- --bounded: the token cache's disk and memory -------------------------------------------

def _proc_status(*keys) -> dict:
  """kB fields of /proc/self/status, in bytes."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      name, _, rest = line.partition(":")
      if name in keys:
        out[name] = int(rest.split()[0]) * 1024
  return out


def _files_bytes(folder: str) -> tuple[int, int]:
  """(apparent size, bytes allocated on disk) of every file under `folder`."""
  size = allocated = 0
  for root, _, files in os.walk(folder):
    for name in files:
      st = os.stat(os.path.join(root, name))
      size, allocated = size + st.st_size, allocated + st.st_blocks * 512
  return size, allocated


def _bounded_model(args, vocab_size: int):
  from t2v2t_jax.models.config import model_config, validate_model_config  # noqa: PLC0415
  cfg = model_config("test/16", "test", args.mode)
  w = int(args.bounded_width)
  cfg.vision.update(width=w, depth=1, num_heads=2, mlp_dim=2 * w, image_size=224,
                    num_frames=int(args.bounded_frames))
  cfg.text.vocab_size = vocab_size
  cfg.text.max_position = 128
  validate_model_config(cfg)
  return cfg


def bounded_child(args) -> dict:
  """One evaluation with `eval.token_cache = args.bounded_child` (a process of its own)."""
  import tempfile  # noqa: PLC0415
  import threading  # noqa: PLC0415

  from flax import nnx  # noqa: PLC0415

  from input_pipeline import pipeline as pipeline_lib  # noqa: PLC0415
  from input_pipeline.config import corpus_config  # noqa: PLC0415
  from t2v2t_jax import sharding as sharding_lib  # noqa: PLC0415
  from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import create_model  # noqa: PLC0415

  cache, root = args.bounded_child, args.bounded_dir
  vocab = os.path.join(root, "vocab.txt")
  with open(vocab) as f:
    cfg = _bounded_model(args, sum(1 for _ in f))
  data = pipeline_lib.make_eval_data(
      corpus_config("anet_like", os.path.join(root, "test.json"), root, paragraph=True),
      tokenizer=vocab, num_frames=int(args.bounded_frames), image_size=224, max_len=64,
      batch_size=int(args.bounded_video_batch), num_workers=0)
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  graphdef, params = nnx.split(create_model(cfg), nnx.Param)
  folder = tempfile.mkdtemp(prefix="t2v2t_bounded_", dir=args.bounded_scratch)
  evaluator = RetrievalEvaluator(graphdef, mesh, k=args.bounded_k, rerank_batch_size=args.rerank_batch,
                                 token_cache=cache,
                                 token_cache_dir=folder if cache == "disk" else None,
                                 progress=False)
  peaks = {"RssAnon": 0, "RssFile": 0}
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      for key, value in _proc_status("RssAnon", "RssFile").items():
        peaks[key] = max(peaks[key], value)
      stop.wait(0.02)

  start_rss = _proc_status("VmRSS")["VmRSS"]
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  t0 = time.perf_counter()
  embedded = evaluator.embed(params, data)
  t1 = time.perf_counter()
  files_after_stage1 = _files_bytes(folder)
  res = evaluator.evaluate(params, data, embedded=embedded)
  t2 = time.perf_counter()
  stop.set()
  sampler.join()
  size, allocated = _files_bytes(folder)
  tokens_per_video = int(args.bounded_frames) * 197 * cfg.vision.width
  out = {"benchmark": "eval_rerank_bounded", **common.device_summary(), "token_cache": cache,
         "videos": data.num_videos, "texts": len(data.texts), "frames": data.num_frames,
         "vision_width": cfg.vision.width, "mode": args.mode, "k": args.bounded_k,
         "video_batch": int(args.bounded_video_batch),
         "token_bytes_per_video_float16": 2 * tokens_per_video,
         "rss_start_bytes": start_rss, "peak_rss_bytes": _proc_status("VmHWM")["VmHWM"],
         "peak_rss_anon_bytes": peaks["RssAnon"], "peak_rss_file_bytes": peaks["RssFile"],
         "files_bytes": size, "files_allocated_bytes": allocated,
         "files_bytes_after_stage1": files_after_stage1[0],
         "stage1_s": t1 - t0, "rerank_s": t2 - t1, "pairs": evaluator.transfer_stats["pairs"],
         "padded_texts": evaluator.transfer_stats["padded_texts"],
         "reread": evaluator.reread_stats, "load": common.load_str(),
         "metrics": {k: res[k] for k in ("emb_t2v_r1", "t2v_r1", "t2v_r5", "v2t_r1", "r_mean")}}
  for root_, _, files in os.walk(folder, topdown=False):
    for name in files:
      os.remove(os.path.join(root_, name))
    os.rmdir(root_)
  return out


def paper_size_bounded(per_token_bytes: float = 2.0) -> dict:
  """ActivityNet val1 at paper size: the token store and the extra encoder work of
  'recompute' (every video is some query's candidate, so all are encoded again)."""
  n, frames, text_len, pairs = 4917, 32, 64, 660_572   # pairs: `simulated_pair_count`
  s = flops_lib.Sizes(frames=frames, text_len=text_len)
  video = flops_lib.total(flops_lib.vision_forward(s, frames))
  text = flops_lib.total(flops_lib.text_forward(s))
  stage1 = n * (video + text)
  out = {"videos": n, "frames": frames, "tokens_per_frame": s.tokens_per_frame,
         "width": s.vision_width,
         "token_store_bytes": n * frames * s.tokens_per_frame * s.vision_width * per_token_bytes,
         "video_encoder_flops_per_video": video, "text_encoder_flops_per_text": text,
         "stage1_flops": stage1, "extra_flops": n * video,
         "extra_over_stage1": n * video / stage1}
  for mode in ("v2t", "t2v2t"):
    rerank = pairs * flops_lib.rerank_per_pair(s, mode)
    out[f"extra_over_whole_eval_{mode}"] = n * video / (stage1 + rerank)
  return out


def bounded_main(args) -> int:
  import json  # noqa: PLC0415
  import subprocess  # noqa: PLC0415

  from input_pipeline import synthetic  # noqa: PLC0415
  root = args.bounded_dir
  if not os.path.exists(os.path.join(root, "test.json")):
    print(f"[eval_rerank] generating {args.bounded_videos} videos of {args.bounded_frames} "
          f"frames into {root}", flush=True)
    synthetic.generate_dataset(root, num_train=0, num_val=0, num_test=args.bounded_videos,
                               size=args.bounded_size, num_frames=args.bounded_frames,
                               fps=8, pair_fraction=0.0)
  results = []
  for cache in args.bounded_caches.split(","):
    argv = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--bounded-child", cache]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
      print(proc.stderr[-3000:], flush=True)
      return 1
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    results.append(r)
    common.emit(r, args.json_out, echo=False)
    print(f"[eval_rerank] token_cache={cache}: peak RSS {common.gib(r['peak_rss_bytes'])} "
          f"(start {common.gib(r['rss_start_bytes'])}; anon {common.gib(r['peak_rss_anon_bytes'])}, "
          f"file {common.gib(r['peak_rss_file_bytes'])}), files "
          f"{r['files_bytes'] / 2**20:.1f} MiB, stage 1 {r['stage1_s']:.1f} s, rerank "
          f"{r['rerank_s']:.1f} s, {r['pairs']} pairs, metrics {r['metrics']}", flush=True)
  if len({json.dumps(r["metrics"], sort_keys=True) for r in results}) != 1:
    print("[eval_rerank] the token caches gave different metrics", flush=True)
    return 1
  paper = paper_size_bounded()
  per_video = results[0]["token_bytes_per_video_float16"]
  print(f"[eval_rerank] {results[0]['videos']} videos x {results[0]['frames']} frames x 197 x "
        f"{results[0]['vision_width']}: {per_video / 2**20:.2f} MiB of float16 tokens a video; "
        f"ActivityNet at paper size ({paper['videos']} x {paper['frames']} x 197 x 768): "
        f"{common.gib(paper['token_store_bytes'])} per process for 'memory' / 'disk'; "
        f"'recompute' adds {100 * paper['extra_over_stage1']:.0f}% of the stage-1 FLOPs "
        f"({paper['extra_flops'] / 1e15:.2f} PFLOPs), "
        f"{100 * paper['extra_over_whole_eval_t2v2t']:.1f}% of the whole t2v2t evaluation, "
        f"{100 * paper['extra_over_whole_eval_v2t']:.1f}% of a v2t one", flush=True)
  common.emit({"benchmark": "eval_rerank_bounded_paper", **paper}, args.json_out)
  return 0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  common.add_model_args(parser)
  parser.add_argument("--modes", default="v2t,t2v2t,t2v2t_naive,joint")
  parser.add_argument("--datasets", default="msrvtt", help=f"comma list of {sorted(DATASETS)}")
  parser.add_argument("--frames-override", type=int,
                      help="inference frames instead of the dataset's (e.g. small on a CPU)")
  parser.add_argument("--text-len-override", type=int)
  parser.add_argument("--rerank-batch", type=int, default=128, help="pairs a device call")
  parser.add_argument("--k", type=int, default=128)
  parser.add_argument("--slot-baseline", action="store_true",
                      help="v2t: also time a slot per pair (a copy of the video per text, the "
                           "layout before slots) on the same inputs, in alternation")
  parser.add_argument("--videos-per-call", type=int,
                      help="distinct videos in a timed device call (default: as a real "
                           "evaluation's batch spans, from k)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--host-batches", type=int, default=2,
                      help="batches timed through score_candidates (0: skip the host path)")
  parser.add_argument("--json-out")
  b = parser.add_argument_group("--bounded: disk and memory per eval.token_cache")
  b.add_argument("--bounded", action="store_true", help="run this case instead")
  b.add_argument("--bounded-caches", default="memory,disk,recompute")
  b.add_argument("--bounded-dir", default="/tmp/t2v2t_bounded_corpus",
                 help="synthetic corpus folder (generated when it has no test.json)")
  b.add_argument("--bounded-scratch", help="folder for the 'disk' cache (default: the temp dir)")
  b.add_argument("--bounded-videos", type=int, default=240)
  b.add_argument("--bounded-frames", type=int, default=32)
  b.add_argument("--bounded-size", type=int, default=112, help="side of the generated videos")
  b.add_argument("--bounded-width", type=int, default=96, help="video encoder width")
  b.add_argument("--bounded-k", type=int, default=16)
  b.add_argument("--bounded-video-batch", type=int, default=8)
  b.add_argument("--bounded-child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.bounded_child:
    common.emit(bounded_child(args), None)
    return 0
  if args.bounded:
    return bounded_main(args)
  common.resolve_args(args)
  common.setup_compile_cache(args.compile_cache)
  from t2v2t_jax import sharding as sharding_lib  # noqa: PLC0415
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  counter = common.CompileCounter()
  failures = 0
  for dataset in args.datasets.split(","):
    for mode in args.modes.split(","):
      try:
        result = bench_one(args, mode.strip(), dataset.strip(), mesh, counter)
      except Exception as e:  # noqa: BLE001 (an OOM is a result too)
        traceback.print_exc()
        msg = str(e)
        failures += 1
        result = {"benchmark": "eval_rerank", "mode": mode, "dataset": dataset,
                  "preset": args.preset, "rerank_batch": args.rerank_batch,
                  "status": "oom" if "RESOURCE_EXHAUSTED" in msg else "error",
                  "error": msg[:2000], **common.device_summary()}
      report(result)
      common.emit(result, args.json_out)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
