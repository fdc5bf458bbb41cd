"""The training run, top to bottom: logging, mesh, data, model, checkpoint, train loop.

One linear function (`train_and_evaluate`) in banner-commented sections, so a reader
follows a run in order. Resume order (first that applies):
  1. the latest usable checkpoint in `workdir/checkpoints` (model, optimizer, step, RNG,
     data iterator, bad-data counts: the run continues exactly where it stopped). Damaged
     newer steps are named and moved to `workdir/checkpoints_damaged/`
     (`checkpoints/run_checkpoints.py`); a workdir with an earlier run's logs and no
     usable step is refused unless `config.start_over` is set (`workdir.py`);
  2. `config.init_from`: another run's workdir/checkpoint folder or a VindLU `.pth`
     (parameters only; temporal embeddings resized by SPEC's rule);
  3. `config.pretrained.beit` / `config.pretrained.bert`: Hugging Face weights;
  4. from scratch.
One trainer per workdir: `workdir/train.lock` names its holder (`workdir_lock.py`). A
resumed run's redone steps replace their metrics rows (`metric_writer.py`); a save that
fails stops the run at once with one line naming the last good step (`CheckpointSaveError`).
"""

from __future__ import annotations

import time
import zlib

import jax
import numpy as np
from absl import logging

from input_pipeline import bad_data
from input_pipeline import pipeline as pipeline_lib
from input_pipeline import text as text_lib
from t2v2t_jax import metric_writer as writer_lib
from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax import storage
from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer
from t2v2t_jax.models.t2v2t import abstract_params
from t2v2t_jax.training import config_checks
from t2v2t_jax.training import initialization
from t2v2t_jax.training import optimizer as optimizer_lib
from t2v2t_jax.training import preemption as preemption_lib
from t2v2t_jax.training import profiling as profiling_lib
from t2v2t_jax.training import train_state as state_lib
from t2v2t_jax.training import train_step as step_lib
from t2v2t_jax.training import workdir as workdir_lib
from t2v2t_jax.training import workdir_lock


class NonFiniteLossError(RuntimeError):
  pass


def train_and_evaluate(config, workdir: str, *, evaluate_at_end: bool = True) -> dict:
  """Trains `config` in `workdir`; returns the final evaluation results (if any).

  Raises `WorkdirLockedError` when another live trainer holds the workdir, and
  `CheckpointSaveError` (one line, the last good step named) when a save fails."""
  config_checks.check_run_settings(config)  # before any work (main.py also checks the data)
  sharding_lib.maybe_initialize_distributed(config)
  storage.makedirs(workdir)  # a local folder or a gs:// prefix (storage.py)
  # One trainer per workdir, taken before anything in it is read or moved (process 0).
  with workdir_lock.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, evaluate_at_end=evaluate_at_end)


def _train_and_evaluate(config, workdir: str, *, evaluate_at_end: bool) -> dict:
  # ------------------------------------------------------------------ Set up logging
  ckpt = Checkpointer(storage.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                      quarantine=True)
  resume_step = ckpt.latest_step()  # the newest usable step; damaged ones are named
  if resume_step is None:
    workdir_lib.check_start_from_scratch(config, workdir, ckpt.damaged)
  workdir_lib.warn_if_resuming_with_changes(config, workdir, resuming=resume_step is not None)
  workdir_lib.save_config(config, workdir)
  is_main = jax.process_index() == 0

  # ------------------------------------------------------------------ Mesh
  mesh = sharding_lib.make_mesh(config.mesh)
  logging.info("Mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
  if is_main:
    print(where_it_runs(mesh), flush=True)
    warning = cpu_warning(config)
    if warning:
      print(warning, flush=True)

  # ------------------------------------------------------------------ Pretrained weights
  # Read and checked against the model's shapes before the data pipeline starts and
  # anything compiles: a wrong name or a damaged file fails in seconds, not after both.
  fetched = initialization.fetch_weights(config) if resume_step is None else None

  # ------------------------------------------------------------------ Input pipeline
  tokenizer = text_lib.load_tokenizer(config.data.tokenizer)
  special_ids = text_lib.special_token_ids(tokenizer, config.model.text.vocab_size)
  train_ds = pipeline_lib.make_train_dataset(
      config.data, tokenizer=tokenizer, global_batch_size=config.batch_size,
      num_frames=config.num_frames, image_size=config.model.vision.image_size, seed=config.seed)
  steps_per_epoch = pipeline_lib.train_steps_per_epoch(config.data, config.batch_size)
  total_updates = optimizer_lib.total_updates(config, steps_per_epoch)
  accum = int(config.optimizer.grad_accum_steps or 1)
  total_micro_steps = total_updates * accum
  # Counts bad samples per batch; checkpointed with the iterator.
  data_iter = bad_data.TrackedIterator(iter(train_ds), bad_data.FailureTracker.from_config(config.data))

  # ------------------------------------------------------------------ Create model & optimizer
  protocol = config.get("protocol", "global")  # VindLU's objective and schedule, or ours
  tx = optimizer_lib.make_optimizer(config.optimizer, total_updates, protocol)
  schedule = optimizer_lib.make_schedule(config.optimizer, total_updates, protocol)
  abstract = state_lib.abstract_state(config.model, tx, config.seed)
  shardings = state_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  graphdef, _ = abstract_params(config.model)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(
          graphdef, tx, special_ids=special_ids,
          temp_bounds=(config.model.temp_min, config.model.temp_max),
          lr_schedule=lambda s: schedule(s // accum),
          **step_lib.objective_settings(config, config.batch_size, mesh)),
      shardings, mesh)

  # ------------------------------------------------------------------ Load checkpoint
  state, source = initialization.initial_state(
      config, ckpt=ckpt, abstract=abstract, shardings=shardings, tx=tx, data_iter=data_iter,
      fetched=fetched)
  if ckpt.restored_step is not None:  # an older step if the newest failed to restore
    source = f"resumed from {ckpt.step_dir(ckpt.restored_step)}"
  start_step = int(state["step"])
  # A resumed run redoes the steps after the one it restored: their rows are replaced
  # (metrics.jsonl rewritten without them, TensorBoard's purge_step), not duplicated.
  writer = writer_lib.MetricWriter(
      workdir, resume_step=start_step if ckpt.restored_step is not None else None)
  logging.info("Starting at step %d (%s); %d steps in all, %d per epoch",
               start_step, source, total_micro_steps, steps_per_epoch)
  if is_main:
    print(f"Starting at step {start_step}/{total_micro_steps} ({source})", flush=True)

  # ------------------------------------------------------------------ Train loop
  failures = data_iter.failures
  step = start_step
  t_last, step_last = time.perf_counter(), step
  last_metrics = None
  eval_interval = eval_interval_steps(config, steps_per_epoch, accum)
  profiler = profiling_lib.StepProfiler(config.get("profile_steps", ""),
                                        storage.join(workdir, "tensorboard"), enabled=is_main)
  # A preemption notice (SIGTERM) makes every process save the same step and stop.
  watch = preemption_lib.PreemptionWatch()
  preempted = None
  try:
    while step < total_micro_steps:
      profiler.start_if_due(step, state)
      local = next(data_iter)  # counted by `failures` (raises past data.failure_fraction)
      # A cheap fingerprint of this process's batch, logged so that a resumed run can be
      # checked against an uninterrupted one batch by batch.
      batch_crc = zlib.crc32(np.ascontiguousarray(local["input_ids"]).tobytes()
                             + np.ascontiguousarray(local["video_idx"]).tobytes())
      batch = sharding_lib.global_batch(local, mesh, pipeline_lib.MODEL_KEYS)
      with profiler.annotate(step + 1):
        state, metrics = train_step(state, batch)
      step += 1
      # Check the previous step's loss (already computed) so the host does not stall.
      if last_metrics is not None:
        _check_finite(last_metrics, step - 1)
      last_metrics = metrics

      if step % config.log_every == 0 or step == total_micro_steps:
        _check_finite(metrics, step)
        now = time.perf_counter()
        rate = (step - step_last) * config.batch_size / max(now - t_last, 1e-9)
        eta = (total_micro_steps - step) * config.batch_size / max(rate, 1e-9)
        host_metrics = jax.tree.map(np.asarray, metrics)
        host_metrics.update(failures.counts())
        writer.write(step, {**host_metrics, "samples_per_sec": rate, "data/batch_crc": batch_crc})
        if is_main:
          print(writer_lib.console_line(step, total_micro_steps, host_metrics, rate, eta,
                                        failures.summary()), flush=True)
        t_last, step_last = now, step
      profiler.stop_if_due(step, state)  # after the step's log line: it belongs to the step

      # Asked by every process at every step: the multi-process protocol counts on it.
      stop = watch.should_stop(step)
      if stop or step % config.checkpoint_every == 0 or step == total_micro_steps:
        _check_finite(metrics, step)  # never overwrite a good checkpoint with a diverged state
        ckpt.save(step, state, data_iter)
      if stop:
        preempted = preemption_lib.Preempted(step, ckpt.step_dir(step))
        break

      if eval_interval and step % eval_interval == 0 and step != total_micro_steps:
        if config.best_key and step % config.checkpoint_every != 0:
          ckpt.save(step, state, data_iter)  # an evaluated step may become the best one
        results = _run_eval(config, state["params"], graphdef, mesh, tokenizer, workdir, step,
                            writer)
        _mark_if_best(config, ckpt, step, results)
  finally:
    profiler.stop(last_step=step)  # a trace still running: the run ended or stopped mid-range
    watch.close()
    ckpt.close()  # waits for the last save, which holds the iterator's state
    # Stops the workers and frees the batches in shared memory (the last one included).
    pipeline_lib.close_iterator(data_iter)
    local = batch = data_iter = None
    pipeline_lib.release_shared_memory()
  if preempted is not None:  # the checkpoint is complete on disk (ckpt.close above)
    writer.close()
    raise preempted
  results = {}
  if evaluate_at_end and config.eval.corpora_enabled:
    results = _run_eval(config, state["params"], graphdef, mesh, tokenizer, workdir, step, writer)
    _mark_if_best(config, ckpt, step, results)
  writer.close()
  return results


def eval_interval_steps(config, steps_per_epoch: int, accum: int) -> int:
  """Micro-steps between evaluations during training (0: only at the end):
  `eval_every_epochs` (VindLU's protocol evaluates after every epoch) or `eval_every`."""
  epochs = config.get("eval_every_epochs", 0)
  if epochs:
    return max(1, int(round(epochs * steps_per_epoch * accum)))
  return config.eval_every


def _mark_if_best(config, ckpt, step: int, results: dict) -> None:
  """VindLU keeps the epoch whose `stop_key` metric is highest: `best_key` is
  `<eval corpus>/<metric>` (e.g. `didemo_val/r_mean`, the mean of R@1/5/10 over both
  directions, reranked); the step that scores best so far is named in `best.json`."""
  if not config.best_key or not results:
    return
  corpus, _, metric = config.best_key.partition("/")
  if metric not in results.get(corpus, {}):
    raise ValueError(f"best_key={config.best_key!r}: the evaluation has no "
                     f"{metric!r} for {corpus!r} (corpora: {sorted(results)}; metrics: "
                     f"{sorted(k for k, v in results.get(corpus, {}).items() if isinstance(v, float))})")
  value = float(results[corpus][metric])
  best = ckpt.best()
  if best is None or best.get("key") != config.best_key or value > best["value"]:
    ckpt.mark_best(step, config.best_key, value)
    if jax.process_index() == 0:
      print(f"Best so far by {config.best_key}: {value:.2f} at step {step} "
            f"({ckpt.step_dir(step)})", flush=True)


def where_it_runs(mesh) -> str:
  """The start line: platform, device kind and count, processes and the mesh, so that a run
  on the wrong backend (a CPU jaxlib on a GPU machine) shows in its first line."""
  device = jax.devices()[0]
  processes = jax.process_count()
  return (f"Running on {jax.device_count()} x {device.device_kind} ({device.platform}"
          f"{f', {processes} processes' if processes > 1 else ''}), mesh "
          f"{', '.join(f'{k}={v}' for k, v in mesh.shape.items())}")


def cpu_warning(config) -> str | None:
  """A warning when a paper-size model is about to train on the CPU: `pip install -e .`
  gives the CPU jaxlib, and on a GPU or TPU machine without the matching jax the recipe
  would otherwise run for days without a word."""
  if jax.default_backend() != "cpu":
    return None
  width = max(config.model.vision.width, config.model.text.width)
  if width < 768:  # the demo and `:tiny` sizes are meant for the CPU
    return None
  return (f"Warning: training a paper-size model (vision {config.model.vision.variant}, text "
          f"{config.model.text.variant}) on the CPU: JAX sees no GPU or TPU. On a GPU "
          f"machine install `pip install -e \".[cuda]\"`, on a TPU VM `pip install -e "
          f"\".[tpu]\"` (README, 'Installing on GPU / TPU'); check with `python -c \"import "
          f"jax; print(jax.devices())\"`.")


def _check_finite(metrics, step):
  loss = float(np.asarray(metrics["loss"]))
  if not np.isfinite(loss):
    raise NonFiniteLossError(
        f"Loss became {loss} at step {step}; stopping. The last good checkpoint is left "
        f"intact: lower the learning rate or check the data, then rerun the same command to "
        f"resume from it.")


def _run_eval(config, params, graphdef, mesh, tokenizer, workdir, step, writer) -> dict:
  from t2v2t_jax.evaluation import evaluate as evaluate_lib  # noqa: PLC0415 (keeps import light)
  return evaluate_lib.evaluate_all(config, params, graphdef, mesh, tokenizer, workdir, step, writer)
