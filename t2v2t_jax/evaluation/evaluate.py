"""Retrieval evaluation of a run: every eval corpus of the config, results to
`workdir/eval/<step>.json`, TensorBoard and the console (with the inference frame count
and the videos that could not be read, `broken_videos.py`)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from input_pipeline import pipeline as pipeline_lib
from t2v2t_jax.evaluation import metrics as metrics_lib
from t2v2t_jax.evaluation.broken_videos import BrokenVideos
from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator
from t2v2t_jax.training import checkpointing
from t2v2t_jax.training import initialization
from t2v2t_jax.training import metric_writer as writer_lib
from t2v2t_jax.training import optimizer as optimizer_lib
from t2v2t_jax.training import run_setup
from t2v2t_jax.training import sharding as sharding_lib
from t2v2t_jax.training import train_state as state_lib


def evaluate_all(config, params, graphdef, mesh, tokenizer, workdir: str, step: int,
                 writer: writer_lib.MetricWriter | None = None) -> dict:
  """Evaluates `params` on every `config.data.eval_corpora`; returns {corpus: metrics}."""
  is_main = jax.process_index() == 0
  per_process_batch = max(1, config.eval.video_batch_size // jax.process_count())
  # Each process's video batch must split evenly over its local devices.
  local_devices = jax.local_device_count()
  per_process_batch = -(-per_process_batch // local_devices) * local_devices
  evaluator = RetrievalEvaluator(
      graphdef, mesh, k=config.eval.k, rerank_batch_size=config.eval.rerank_batch_size,
      text_batch_size=config.eval.text_batch_size, alpha=config.eval.alpha,
      token_cache_dir=(os.path.join(workdir, "eval_cache") if config.eval.token_cache == "disk" else None),
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
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{step}.json"), "w") as f:
      json.dump(_jsonable(results), f, indent=2)
  return results


def _jsonable(tree):
  if isinstance(tree, dict):
    return {k: _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (np.generic, np.ndarray)):
    return tree.tolist()
  return tree


def load_params(config, workdir: str, *, purpose: str = "Evaluating"):
  """The parameters to use: the latest checkpoint of `workdir`, else `config.init_from`.

  Returns `(params, graphdef, mesh, step)` (step 0 for `init_from`); prints
  `f"{purpose} <source>"` on the main process. Used by `--mode eval` and `--mode search`.
  """
  mesh = sharding_lib.make_mesh(config.mesh)
  tx = optimizer_lib.make_optimizer(config.optimizer, 1)
  abstract = state_lib.abstract_state(config.model, tx, config.seed)
  shardings = state_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  graphdef = state_lib.model_graphdef(config.model)
  is_main = jax.process_index() == 0

  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = None
  if os.path.isdir(ckpt_dir):
    ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=False)
    # The newest usable step (damaged ones are named, and left where they are).
    step = ckpt.latest_step(data_iter=False)
    if step is not None:
      state = ckpt.restore(step, checkpointing.abstract_with_shardings(abstract, shardings))
      params, step = state["params"], ckpt.restored_step
      if is_main:
        print(f"{purpose} {ckpt_dir}/{step}", flush=True)
    ckpt.close()
  if step is None:
    if not config.init_from:
      raise FileNotFoundError(f"No checkpoint in {ckpt_dir} and no --config.init_from to load")
    state = state_lib.create_sharded_state(config.model, tx, config.seed, shardings)
    params = initialization.assign_params(
        state["params"], initialization.load_params_from(config.init_from, config),
        source=config.init_from)
    step = 0
    if is_main:
      print(f"{purpose} {config.init_from}", flush=True)
  return params, graphdef, mesh, step


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--mode eval`: the latest checkpoint of `workdir`, else `config.init_from`."""
  tokenizer = run_setup.load_tokenizer(config)
  run_setup.special_token_ids(tokenizer, config.model.text.vocab_size)
  params, graphdef, mesh, step = load_params(config, workdir)
  writer = writer_lib.MetricWriter(workdir)
  results = evaluate_all(config, params, graphdef, mesh, tokenizer, workdir, step, writer)
  writer.close()
  return results
