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
"""

from __future__ import annotations

import os
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
from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer
from t2v2t_jax.models.t2v2t import abstract_params
from t2v2t_jax.training import config_checks
from t2v2t_jax.training import initialization
from t2v2t_jax.training import optimizer as optimizer_lib
from t2v2t_jax.training import train_state as state_lib
from t2v2t_jax.training import train_step as step_lib
from t2v2t_jax.training import workdir as workdir_lib


class NonFiniteLossError(RuntimeError):
  pass


def train_and_evaluate(config, workdir: str, *, evaluate_at_end: bool = True) -> dict:
  """Trains `config` in `workdir`; returns the final evaluation results (if any)."""
  # ------------------------------------------------------------------ Set up logging
  config_checks.check_run_settings(config)  # before any work (main.py also checks the data)
  sharding_lib.maybe_initialize_distributed(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                      quarantine=True)
  resume_step = ckpt.latest_step()  # the newest usable step; damaged ones are named
  if resume_step is None:
    workdir_lib.check_start_from_scratch(config, workdir, ckpt.damaged)
  workdir_lib.warn_if_resuming_with_changes(config, workdir, resuming=resume_step is not None)
  workdir_lib.save_config(config, workdir)
  writer = writer_lib.MetricWriter(workdir)
  is_main = jax.process_index() == 0

  # ------------------------------------------------------------------ Mesh
  mesh = sharding_lib.make_mesh(config.mesh)
  logging.info("Mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

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
  tx = optimizer_lib.make_optimizer(config.optimizer, total_updates)
  schedule = optimizer_lib.make_schedule(config.optimizer, total_updates)
  abstract = state_lib.abstract_state(config.model, tx, config.seed)
  shardings = state_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  graphdef, _ = abstract_params(config.model)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(
          graphdef, tx, loss_weights=config.loss_weights, special_ids=special_ids,
          temp_bounds=(config.model.temp_min, config.model.temp_max),
          lr_schedule=lambda s: schedule(s // accum),
          negative_groups=step_lib.negative_groups(
              config.get("vtm_negatives", "global"), config.batch_size, mesh)),
      shardings, mesh)

  # ------------------------------------------------------------------ Load checkpoint
  state, source = initialization.initial_state(
      config, ckpt=ckpt, abstract=abstract, shardings=shardings, tx=tx, data_iter=data_iter)
  if ckpt.restored_step is not None:  # an older step if the newest failed to restore
    source = f"resumed from {ckpt.step_dir(ckpt.restored_step)}"
  start_step = int(state["step"])
  logging.info("Starting at step %d (%s); %d steps in all, %d per epoch",
               start_step, source, total_micro_steps, steps_per_epoch)
  if is_main:
    print(f"Starting at step {start_step}/{total_micro_steps} ({source})", flush=True)

  # ------------------------------------------------------------------ Train loop
  failures = data_iter.failures
  step = start_step
  t_last, step_last = time.perf_counter(), step
  last_metrics = None
  try:
    while step < total_micro_steps:
      local = next(data_iter)  # counted by `failures` (raises past data.failure_fraction)
      # A cheap fingerprint of this process's batch, logged so that a resumed run can be
      # checked against an uninterrupted one batch by batch.
      batch_crc = zlib.crc32(np.ascontiguousarray(local["input_ids"]).tobytes()
                             + np.ascontiguousarray(local["video_idx"]).tobytes())
      batch = sharding_lib.global_batch(local, mesh, pipeline_lib.MODEL_KEYS)
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

      if step % config.checkpoint_every == 0 or step == total_micro_steps:
        _check_finite(metrics, step)  # never overwrite a good checkpoint with a diverged state
        ckpt.save(step, state, data_iter)

      if config.eval_every and step % config.eval_every == 0 and step != total_micro_steps:
        _run_eval(config, state["params"], graphdef, mesh, tokenizer, workdir, step, writer)
  finally:
    ckpt.close()  # waits for the last save, which holds the iterator's state
    # Stops the workers and frees the batches in shared memory (the last one included).
    pipeline_lib.close_iterator(data_iter)
    local = batch = data_iter = None
    pipeline_lib.release_shared_memory()
  results = {}
  if evaluate_at_end and config.eval.corpora_enabled:
    results = _run_eval(config, state["params"], graphdef, mesh, tokenizer, workdir, step, writer)
  writer.close()
  return results


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
