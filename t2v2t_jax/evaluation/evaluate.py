"""Retrieval evaluation of a run: every eval corpus of the config, results to
`workdir/eval/<step>.json`, TensorBoard and the console (with the inference frame count
and the videos that could not be read, `broken_videos.py`).

`evaluate_all` takes the model as (graphdef, params): the train loop calls it with its
live parameters; `evaluate_checkpoint` (`--mode eval`) restores the parameters alone
(`checkpoints/restore.py`), never the optimizer state.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from input_pipeline import pipeline as pipeline_lib
from input_pipeline import text as text_lib
from t2v2t_jax import metric_writer as writer_lib
from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax import storage
from t2v2t_jax.checkpoints import restore
from t2v2t_jax.evaluation import metrics as metrics_lib
from t2v2t_jax.evaluation.broken_videos import BrokenVideos
from t2v2t_jax.evaluation.retrieval import TOKEN_CACHES, RetrievalEvaluator


def evaluate_all(config, params, graphdef, mesh, tokenizer, workdir: str, step: int,
                 writer=None) -> dict:
  """Evaluates `params` on every `config.data.eval_corpora`; returns {corpus: metrics}.

  `writer`: anything with `write(step, metrics, prefix=...)` (a `MetricWriter`), or None."""
  is_main = jax.process_index() == 0
  per_process_batch = max(1, config.eval.video_batch_size // jax.process_count())
  # Each process's video batch must split evenly over its local devices.
  local_devices = jax.local_device_count()
  per_process_batch = -(-per_process_batch // local_devices) * local_devices
  evaluator = RetrievalEvaluator(
      graphdef, mesh, k=config.eval.k, rerank_batch_size=config.eval.rerank_batch_size,
      text_batch_size=config.eval.text_batch_size, alpha=config.eval.alpha,
      token_cache_dir=(_token_cache_dir(workdir) if config.eval.token_cache == "disk" else None),
      progress=is_main)
  results = {}
  for corpus_cfg in config.data.eval_corpora:
    data = pipeline_lib.make_eval_data(
        corpus_cfg, tokenizer=tokenizer, num_frames=config.eval.num_frames,
        image_size=config.model.vision.image_size, max_len=config.data.max_len,
        add_sep=config.data.add_sep, batch_size=per_process_batch,
        source=config.data.source, prepared_dir=config.data.prepared_dir,
        num_workers=config.data.num_workers, worker_threads=config.data.worker_threads,
        prefetch=config.data.prefetch)
    evaluator.token_cache = token_cache_for(config, data.num_videos, data.num_frames,
                                            announce=is_main)
    broken = BrokenVideos(data)
    embedded = evaluator.embed(params, broken.watch(data))
    broken.collect()
    broken.check(config.data.failure_fraction)  # before the reranking
    res = evaluator.evaluate(params, data, num_frames=data.num_frames, embedded=embedded)
    res["num_broken_videos"] = len(broken.entries)
    if is_main:
      print(f"\nRetrieval on {data.name} at step {step} "
            f"({res['num_videos']} videos, {res['num_texts']} texts, k={res['k']}, "
            f"{res['num_frames']} inference frames):")
      print(metrics_lib.format_table(res, res["num_frames"]), flush=True)
      if broken.entries:
        print(broken.report(), flush=True)
    if writer is not None:
      writer.write(step, res, prefix=f"eval/{data.name}/")
    results[data.name] = {**res, "broken_videos": broken.entries}
  if is_main:
    out_dir = storage.join(workdir, "eval")
    storage.makedirs(out_dir)
    storage.write_text(storage.join(out_dir, f"{step}.json"),
                       json.dumps(_jsonable(results), indent=2))
  return results


def token_bytes(model_config, num_videos: int, num_frames: int) -> int:
  """Bytes of one corpus's float16 video tokens as 'memory' and 'disk' keep them (on every
  process): videos x frames x (patches + [CLS]) x width x 2."""
  vision = model_config.vision
  tokens = 1 + (vision.image_size // vision.patch_size) ** 2
  return int(num_videos) * int(num_frames) * tokens * int(vision.width) * 2


def token_cache_for(config, num_videos: int, num_frames: int, *, announce: bool = False) -> str:
  """`eval.token_cache` for one corpus; 'auto': 'memory' when its tokens fit in
  `eval.token_memory_gib`, else 'recompute' (a second video-encoder pass instead of
  holding them: ActivityNet at 32 frames is 44 GiB a process)."""
  choice = config.eval.token_cache
  if choice not in TOKEN_CACHES + ("auto",):
    raise ValueError(f"eval.token_cache must be 'auto' or one of {TOKEN_CACHES}, got {choice!r}")
  if choice != "auto":
    return choice
  size = token_bytes(config.model, num_videos, num_frames)
  limit_gib = config.eval.get("token_memory_gib", 8.0)   # absent from configs saved before it
  if size <= limit_gib * 2**30:
    return "memory"
  if announce:
    print(f"eval.token_cache='auto': the video tokens would take {size / 2**30:.1f} GiB "
          f"(> eval.token_memory_gib {limit_gib:g}), so the rerank encodes "
          f"the videos again instead of keeping them", flush=True)
  return "recompute"


def _token_cache_dir(workdir: str) -> str:
  """Where video tokens are memory-mapped: under the workdir, or, for a workdir on GCS (a
  memory map needs a local file), a local temporary folder, said once."""
  if not storage.is_remote(workdir):
    return os.path.join(workdir, "eval_cache")
  import tempfile  # noqa: PLC0415
  local = tempfile.mkdtemp(prefix="t2v2t_eval_cache_")
  if jax.process_index() == 0:
    print(f"eval.token_cache='disk' with the workdir on GCS: the video tokens are memory-mapped "
          f"in the local {local} instead", flush=True)
  return local


def _jsonable(tree):
  if isinstance(tree, dict):
    return {k: _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (np.generic, np.ndarray)):
    return tree.tolist()
  return tree


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--mode eval`: the latest checkpoint of `workdir`, else `config.init_from`."""
  tokenizer = text_lib.load_tokenizer(config.data.tokenizer)
  text_lib.special_token_ids(tokenizer, config.model.text.vocab_size)  # raises if too many
  mesh = sharding_lib.make_mesh(config.mesh)
  params, graphdef, step = restore.load_params(config, workdir, mesh)
  writer = writer_lib.MetricWriter(workdir)
  results = evaluate_all(config, params, graphdef, mesh, tokenizer, workdir, step, writer)
  writer.close()
  return results
