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

Examples:
  python benchmarks/eval_rerank.py                          # test size on the CPU
  python benchmarks/eval_rerank.py --preset paper --datasets msrvtt,anet --modes t2v2t,v2t
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
  args = parser.parse_args(argv)
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
