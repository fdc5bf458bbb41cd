"""A run's config checked before any work: every failure here would otherwise come after
minutes of compiling (or, for `keep_checkpoints=0`, after Orbax deleted every checkpoint).

`check_config` is what `main.py` runs for every mode: the model fields, the run's own
numbers and paths (`check_run_settings`, which training repeats for callers that skip
main.py), and every annotation file and media folder the mode reads.
"""

from __future__ import annotations

import os

from input_pipeline import annotations as annotations_lib
from input_pipeline import prepared_source
from t2v2t_jax.models.config import validate_model_config

DATA_HELP = "docs/data.md explains how to prepare each dataset"


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
  if config.get("vtm_negatives", "global") not in ("global", "per_device"):
    raise ValueError(f"vtm_negatives={config.vtm_negatives!r} is not one of ['global', 'per_device']")
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
