"""Run-level setup shared by training and evaluation: config checks before any work,
multi-host initialisation, tokenizer, step counts."""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections

from input_pipeline import annotations as annotations_lib
from input_pipeline import prepared_source
from input_pipeline import text as text_lib
from t2v2t_jax import config_reference
from t2v2t_jax.models.config import validate_model_config

DATA_HELP = "docs/data.md explains how to prepare each dataset"


def maybe_initialize_distributed(config) -> None:
  """`jax.distributed.initialize()` when the config asks for multi-host (once per process)."""
  mh = config.get("multihost", None)
  if not mh or not mh.get("enabled", False):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  for key in ("coordinator_address", "num_processes", "process_id"):
    value = mh.get(key, None)
    if value not in (None, "", -1):
      kwargs[key] = value
  jax.distributed.initialize(**kwargs)


AUTO_CREATED = "created_by_recipe.json"  # written by prepare_data next to the dataset


def _synthetic_settings(syn) -> dict:
  return {"seed": syn.seed, "size": syn.size, "fps": syn.fps, "num_frames": syn.num_frames,
          "counts": {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}}


def _check_synthetic_settings(root: str, syn) -> None:
  """A synthetic dataset that a recipe created (`AUTO_CREATED` marker) must match the
  config's generation settings: a recipe whose settings changed (frame size, counts,
  seed) would otherwise train on stale data. Datasets made by hand are not checked."""
  marker = os.path.join(root, AUTO_CREATED)
  if not os.path.isfile(marker):
    return
  with open(marker) as f:
    found = json.load(f)
  wanted = _synthetic_settings(syn)
  if found != wanted:
    diff = ", ".join(f"{k}: {found.get(k)} (config: {wanted[k]})" for k in wanted
                     if found.get(k) != wanted[k])
    raise ValueError(
        f"The synthetic dataset in {root} was generated with other settings ({diff}). "
        f"Delete {root} to regenerate it, or set --config.data_root to another folder.")


def prepare_data(config) -> None:
  """Creates the synthetic dataset at `data_root` if the config asks for it and it is absent."""
  syn = config.get("synthetic", None)
  if not syn or not syn.get("create_if_missing", False):
    return
  root = config.data_root
  if os.path.isfile(os.path.join(root, "train.json")):
    _check_synthetic_settings(root, syn)
    return
  # Other hosts wait at the barrier below until process 0 has written the files.
  if jax.process_index() == 0:
    from input_pipeline import synthetic  # noqa: PLC0415
    print(f"Creating the synthetic dataset in {root} ...", flush=True)
    synthetic.generate_dataset(root, num_train=syn.num_train, num_val=syn.num_val,
                               num_test=syn.num_test, seed=syn.seed, size=syn.size, fps=syn.fps,
                               num_frames=syn.num_frames)
    with open(os.path.join(root, AUTO_CREATED), "w") as f:
      json.dump(_synthetic_settings(syn), f)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("synthetic dataset ready")


def check_run_settings(config, mode: str = "train") -> None:
  """The run's own numbers and paths, checked at once (a zero interval would otherwise
  fail after the whole compile, and `keep_checkpoints=0` would let Orbax delete every
  checkpoint, the final one included)."""
  if mode in ("train", "train_and_eval"):
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
      value = config.get(key)
      if not isinstance(value, int) or value < 1:
        what = ("the number of latest checkpoints kept: 0 would delete every one, the final "
                "one included" if key == "keep_checkpoints" else "a number of steps")
        raise ValueError(f"{key}={value!r} must be an integer >= 1 ({what})")
    if not isinstance(config.eval_every, int) or config.eval_every < 0:
      raise ValueError(f"eval_every={config.eval_every!r} must be an integer >= 0 (0: "
                       "evaluate only at the end)")
    if config.get("total_steps") is not None and config.total_steps < 0:
      raise ValueError(f"total_steps={config.total_steps} must be >= 0 (0: from the epochs)")
  fraction = config.data.get("failure_fraction", 0.0)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"data.failure_fraction={fraction} must be within [0, 1]")
  source = config.get("init_from") or ""
  if source:
    is_file = source.endswith((".pth", ".pt", ".bin"))
    exists = os.path.isfile(source) if is_file else os.path.isdir(source)
    if not exists:
      kind = "file" if is_file else "folder (a run's workdir, its checkpoints folder or a step)"
      raise FileNotFoundError(f"init_from={source!r} not found: no such {kind}")


def check_config(config, mode: str) -> None:
  """Everything that can be checked before compiling: fields, data files, media roots."""
  validate_model_config(config.model)
  if config.batch_size <= 0:
    raise ValueError(f"batch_size={config.batch_size} must be positive")
  if mode != "prepare":
    check_run_settings(config, mode)
  corpora = []
  if mode in ("train", "train_and_eval"):
    if not config.data.train_corpora:
      raise ValueError("config.data.train_corpora is empty: nothing to train on")
    corpora += list(config.data.train_corpora)
  if mode in ("eval", "train_and_eval"):
    corpora += list(config.data.eval_corpora)
  loaded = []
  for corpus in corpora:
    for key in ("anno_file", "media_root"):
      path = corpus[key]
      exists = os.path.isfile(path) if key == "anno_file" else os.path.isdir(path)
      if not exists:
        raise FileNotFoundError(
            f"{key} of corpus {corpus['name']!r} not found: {path} ({DATA_HELP}; set "
            f"--config.data_root to the folder that holds your data)")
    # Every entry is checked now (keys, types), so a malformed file fails before compiling.
    loaded.append(annotations_lib.load_corpus_from_config(corpus))
  # With data.source='prepared', every corpus must be prepared (and match its annotations).
  prepared_source.check_sources(config.data, corpora, loaded)


_ABSENT = object()


def config_differences(saved: dict, config) -> list[tuple[str, object, object]]:
  """`(dotted field, saved value, value in config)` for every field that differs between a
  saved `config.json` (parsed) and `config`; a field one of them lacks shows as None."""
  # Both sides through JSON, so that tuples, lists and references compare as saved.
  old = config_reference.flatten(ml_collections.ConfigDict(saved))
  new = config_reference.flatten(ml_collections.ConfigDict(json.loads(config.to_json_best_effort())))
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def describe_differences(diffs, limit: int = 12) -> str:
  text = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in diffs[:limit])
  return text + (f", and {len(diffs) - limit} more" if len(diffs) > limit else "")


def warn_if_resuming_with_changes(config, workdir: str, *, resuming: bool) -> list:
  """A run that continues from `workdir`'s checkpoint (`resuming`) with another config
  resumes, but not exactly (batches, schedule) and, for model fields, maybe not at all:
  say which fields changed before anything else happens. Returns the differences."""
  path = os.path.join(workdir, "config.json")
  if not resuming or not os.path.isfile(path):
    return []
  with open(path) as f:
    diffs = config_differences(json.load(f), config)
  if diffs and jax.process_index() == 0:
    print(f"Warning: {workdir} holds checkpoints of a run with other settings; resuming "
          f"with these changes: {describe_differences(diffs)}. Use a new --workdir to start "
          f"afresh (or --config.init_from={workdir} to start from its parameters).",
          flush=True)
  return diffs


PREVIOUS_RUNS = "previous_runs"  # where `start_over` moves an earlier run's logs


def _logged_training(metrics_path: str) -> bool:
  """Whether `metrics.jsonl` holds a training step (a row with a loss); evaluation rows
  alone, e.g. of a zero-shot `--mode eval` in the same folder, do not count."""
  try:
    with open(metrics_path) as f:
      for line in f:
        try:
          if "loss" in json.loads(line):
            return True
        except ValueError:
          continue  # a line cut short by a crash
  except OSError:
    pass
  return False


def earlier_run(workdir: str) -> list[str]:
  """What an earlier training run left in `workdir` that a run from scratch would mix
  with or silently drop: logged training steps, damaged checkpoints set aside. (A
  `config.json` alone, from a run that stopped before its first step, loses nothing.)"""
  from t2v2t_jax.training.checkpointing import DAMAGED_DIR  # noqa: PLC0415

  found = []
  if _logged_training(os.path.join(workdir, "metrics.jsonl")):
    found.append("metrics.jsonl")
  damaged = os.path.join(workdir, DAMAGED_DIR)
  if os.path.isdir(damaged) and os.listdir(damaged):
    found.append(DAMAGED_DIR + "/")
  return found


def check_start_from_scratch(config, workdir: str, damaged: dict | None = None) -> None:
  """Called when `workdir` has no usable checkpoint: a new run may start there only if no
  earlier run is in it, or if `config.start_over` says so, and then the earlier run's logs
  are moved to `previous_runs/<n>/` first. Raises `NoUsableCheckpointError` otherwise."""
  from t2v2t_jax.training.checkpointing import NoUsableCheckpointError  # noqa: PLC0415

  found = earlier_run(workdir)
  if damaged:
    found.append("damaged checkpoint step(s) " + ", ".join(map(str, sorted(damaged))))
  if not found:
    return
  if not config.get("start_over", False):
    raise NoUsableCheckpointError(
        f"{workdir} holds an earlier run ({', '.join(found)}) but no usable checkpoint to "
        f"resume from; refusing to start from scratch over it. Use a new --workdir, or pass "
        f"--config.start_over=True to start from scratch here (the earlier run's logs are "
        f"then moved to {os.path.join(workdir, PREVIOUS_RUNS)}/<n>/).")
  moved = _move_logs_aside(workdir)
  if jax.process_index() == 0:
    print(f"Starting over in {workdir} (start_over=True): no usable checkpoint; the earlier "
          f"run's logs were moved to {moved}.", flush=True)


def _move_logs_aside(workdir: str) -> str:
  base = os.path.join(workdir, PREVIOUS_RUNS)
  n = 1
  while os.path.exists(os.path.join(base, str(n))):
    n += 1
  target = os.path.join(base, str(n))
  if jax.process_index() == 0:
    os.makedirs(target)
    for name in ("config.json", "metrics.jsonl", "tensorboard", "eval", "eval_cache"):
      if os.path.exists(os.path.join(workdir, name)):
        shutil.move(os.path.join(workdir, name), os.path.join(target, name))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("earlier run moved aside")
  return target


def save_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_tokenizer(config):
  return text_lib.load_tokenizer(config.data.tokenizer)


def special_token_ids(tokenizer, model_vocab_size: int) -> dict:
  if len(tokenizer) > model_vocab_size:
    raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but model.text.vocab_size is "
                     f"{model_vocab_size}; raise model.text.vocab_size.")
  return {"cls": int(tokenizer.cls_token_id), "pad": int(tokenizer.pad_token_id),
          "mask": int(tokenizer.mask_token_id), "vocab_size": int(model_vocab_size)}


def total_steps(config, steps_per_epoch_: int) -> int:
  """Optimizer updates of the run: `config.total_steps` if set, else epochs x steps/epoch."""
  accum = int(config.optimizer.grad_accum_steps or 1)
  if config.get("total_steps"):
    return int(config.total_steps)
  return max(1, int(round(config.optimizer.epochs * steps_per_epoch_ / accum)))
