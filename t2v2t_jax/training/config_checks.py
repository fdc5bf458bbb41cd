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
from t2v2t_jax import storage
from t2v2t_jax.errors import Refusal
from t2v2t_jax.models.config import validate_model_config

DATA_HELP = "docs/data.md explains how to prepare each dataset"


def check_run_settings(config, mode: str = "train") -> None:
  """The run's own numbers and paths, checked at once (a zero interval would otherwise
  fail after the whole compile, and `keep_checkpoints=0` would let Orbax delete every
  checkpoint, the final one included)."""
  check_numbers(config)
  protocol = config.get("protocol", "global")
  if protocol not in ("vindlu", "global"):
    raise Refusal(f"protocol={protocol!r} is not one of ['vindlu', 'global']")
  from t2v2t_jax.training import optimizer as optimizer_lib  # noqa: PLC0415
  from t2v2t_jax.training import train_step as step_lib  # noqa: PLC0415
  optimizer_lib.schedule_name(config.optimizer, protocol)
  if protocol == "vindlu" and mode in ("train", "train_and_eval"):
    step_lib.vindlu_row_groups(config.batch_size, config.vindlu_gpu_batch)
  if mode in ("train", "train_and_eval"):
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
      value = config.get(key)
      if not isinstance(value, int) or value < 1:
        what = ("the number of latest checkpoints kept: 0 would delete every one, the final "
                "one included" if key == "keep_checkpoints" else "a number of steps")
        raise Refusal(f"{key}={value!r} must be an integer >= 1 ({what})")
    if not isinstance(config.eval_every, int) or config.eval_every < 0:
      raise Refusal(f"eval_every={config.eval_every!r} must be an integer >= 0 (0: "
                    "evaluate only at the end)")
    epochs = config.get("eval_every_epochs", 0)
    if not isinstance(epochs, (int, float)) or epochs < 0:
      raise Refusal(f"eval_every_epochs={epochs!r} must be a number >= 0 (0: use eval_every)")
    _check_best_key(config)
    if config.get("total_steps") is not None and config.total_steps < 0:
      raise Refusal(f"total_steps={config.total_steps} must be >= 0 (0: from the epochs)")
    check_profile_steps(config)
  if config.get("vtm_negatives", "global") not in ("global", "per_device"):
    raise Refusal(f"vtm_negatives={config.vtm_negatives!r} is not one of ['global', 'per_device']")
  fraction = config.data.get("failure_fraction", 0.0)
  if not 0.0 <= fraction <= 1.0:
    raise Refusal(f"data.failure_fraction={fraction} must be within [0, 1]")
  source = config.get("init_from") or ""
  if source:
    storage.check_path(source, "init_from")
    is_file = source.endswith((".pth", ".pt", ".bin"))
    exists = storage.isfile(source) if is_file else storage.isdir(source)
    if not exists:
      kind = "file" if is_file else "folder (a run's workdir, its checkpoints folder or a step)"
      raise FileNotFoundError(f"init_from={source!r} not found: no such {kind}")


def check_profile_steps(config) -> None:
  """`profile_steps` is '' or 'START:STOP' (a typo would otherwise surface only when the
  train loop starts, after the data, the model and the checkpoint are loaded)."""
  from t2v2t_jax.training import profiling  # noqa: PLC0415 (imports JAX)
  profiling.parse_profile_steps(config.get("profile_steps", ""))


# (field, low, high, low inclusive, high inclusive, what it is): every number a run uses,
# checked before anything compiles. A bound of None is open.
_RANGES = (
    ("optimizer.lr", 0.0, None, False, True, "the peak learning rate"),
    ("optimizer.min_lr", 0.0, None, True, True, "the final learning rate"),
    ("optimizer.epochs", 0.0, None, False, True, "epochs"),
    ("optimizer.warmup_epochs", 0.0, None, True, True, "warmup epochs"),
    ("optimizer.weight_decay", 0.0, None, True, True, "AdamW's decay"),
    ("optimizer.b1", 0.0, 1.0, True, False, "Adam's first-moment decay"),
    ("optimizer.b2", 0.0, 1.0, True, False, "Adam's second-moment decay"),
    ("optimizer.eps", 0.0, None, False, True, "Adam's epsilon"),
    ("optimizer.grad_clip_norm", 0.0, None, False, True, "the gradient-norm clip (None: none)"),
    ("loss_weights.vtc", 0.0, None, True, True, "a loss weight"),
    ("loss_weights.vtm", 0.0, None, True, True, "a loss weight"),
    ("loss_weights.mlm", 0.0, None, True, True, "a loss weight"),
    ("model.temp_init", 0.0, None, False, True, "the contrastive temperature"),
    ("model.temp_min", 0.0, None, False, True, "the temperature's lower bound"),
    ("model.temp_max", 0.0, None, False, True, "the temperature's upper bound"),
    ("model.vision.drop_path_rate", 0.0, 1.0, True, False, "a stochastic-depth rate"),
    ("model.vision.dropout_rate", 0.0, 1.0, True, False, "a dropout rate"),
    ("model.text.dropout_rate", 0.0, 1.0, True, False, "a dropout rate"),
    ("eval.alpha", 0.0, None, True, True, "the weight of the stage-1 similarity in the score"),
    ("eval.token_memory_gib", 0.0, None, False, True, "the memory for cached video tokens"),
)
# Integers >= 1.
_COUNTS = ("batch_size", "num_frames", "optimizer.grad_accum_steps", "eval.num_frames", "eval.k",
           "eval.rerank_batch_size", "eval.video_batch_size", "eval.text_batch_size",
           "data.worker_threads", "data.prefetch", "data.max_attempts",
           "data.prepare_shard_size", "vindlu_gpu_batch", "vindlu_world_size")
# Integers >= 0 (0 has a meaning: no worker process, no minimum, none listed, one per core).
_NON_NEGATIVE = ("data.num_workers", "data.failure_min_samples", "data.failures_listed",
                 "data.prepare_workers")


def _get(config, dotted: str):
  node = config
  for key in dotted.split("."):
    if not hasattr(node, "get") or key not in node:
      return _MISSING
    node = node[key]
  return node


_MISSING = object()


def _interval(low, high, low_in, high_in) -> str:
  left = ("[" if low_in else "(") + ("-inf" if low is None else f"{low:g}")
  right = ("inf" if high is None else f"{high:g}") + ("]" if high_in else ")")
  return f"{left}, {right}"


def check_numbers(config) -> None:
  """Every numeric setting a run uses, checked before any work: signs, ranges, finiteness,
  the order of pairs and the batch over the devices, each refusal naming the field and
  its valid range (a negative learning rate would otherwise train uphill and exit 0)."""
  import math  # noqa: PLC0415
  for field, low, high, low_in, high_in, what in _RANGES:
    value = _get(config, field)
    if value is _MISSING or value is None:
      continue
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
      ok = ((low is None or value > low or (low_in and value == low))
            and (high is None or value < high or (high_in and value == high)))
    if not ok:
      raise Refusal(f"{field}={value!r} is out of range: {what} must be a finite number "
                    f"in {_interval(low, high, low_in, high_in)}")
  for fields, least in ((_COUNTS, 1), (_NON_NEGATIVE, 0)):
    for field in fields:
      value = _get(config, field)
      if value is _MISSING:
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise Refusal(f"{field}={value!r} must be an integer >= {least}")
  max_len = _get(config, "data.max_len")
  if max_len is not _MISSING and (not isinstance(max_len, int) or max_len < 2):
    raise Refusal(f"data.max_len={max_len!r} must be an integer >= 2 ([CLS] and one token)")
  opt, model = config.optimizer, config.model
  if opt.min_lr > opt.lr:
    raise Refusal(f"optimizer.min_lr={opt.min_lr} must not exceed optimizer.lr={opt.lr}")
  if opt.warmup_epochs > opt.epochs:
    raise Refusal(f"optimizer.warmup_epochs={opt.warmup_epochs} must not exceed "
                  f"optimizer.epochs={opt.epochs}")
  if not model.temp_min <= model.temp_init <= model.temp_max:
    raise Refusal(f"model.temp_min={model.temp_min} <= model.temp_init={model.temp_init} <= "
                  f"model.temp_max={model.temp_max} must hold")


def check_batch_over_devices(config, device_count: int) -> None:
  """The global batch is split evenly over the mesh's devices (all hosts)."""
  if config.batch_size % device_count:
    raise Refusal(f"batch_size={config.batch_size} must be a multiple of the {device_count} "
                  f"devices it is split over (e.g. {device_count * max(1, round(config.batch_size / device_count))})")


def _check_best_key(config) -> None:
  key = config.get("best_key", "")
  if config.get("pick_checkpoint", "best") not in ("best", "latest"):
    raise Refusal(f"pick_checkpoint={config.pick_checkpoint!r} is not one of ['best', 'latest']")
  if not key:
    return
  corpus, _, metric = key.partition("/")
  names = [c["name"] for c in config.data.eval_corpora]
  if corpus not in names or not metric:
    raise Refusal(f"best_key={key!r} must be '<eval corpus>/<metric>' with the corpus one "
                  f"of {names} (e.g. '{names[0] if names else 'corpus'}/r_mean')")


def check_paths(config, workdir: str | None, mode: str = "train") -> None:
  """Every path the run names is local or `gs://` (an unknown URL scheme fails at once, not
  after creating a local folder named `s3:`); the run's media folders and prepared shards
  must be local (mounted), since they are read object by object."""
  if workdir:
    storage.check_path(workdir, "--workdir")
  storage.check_path(config.data.tokenizer, "data.tokenizer")
  for field in ("beit", "bert"):
    if config.pretrained.get(field):
      storage.check_path(config.pretrained[field], f"pretrained.{field}")
  corpora = list(config.data.train_corpora) + list(config.data.eval_corpora)
  for corpus in corpora:
    storage.check_path(corpus["anno_file"], f"anno_file of corpus {corpus['name']!r}")
    storage.check_local_only(corpus["media_root"], f"media_root of corpus {corpus['name']!r}",
                             "videos and images")
  if config.data.get("source") == "prepared" or mode == "prepare":
    storage.check_local_only(config.data.prepared_dir, "data.prepared_dir",
                             "prepared frame shards (ArrayRecord)")


def check_initialization(config, workdir: str | None, mode: str) -> None:
  """A fine-tuning recipe (`requires_init`) started with neither `init_from` nor
  `pretrained` weights would fine-tune random weights for hours: refused at once, unless
  the workdir already holds checkpoints to resume from or `allow_random_init` is set."""
  if mode not in ("train", "train_and_eval") or not config.get("requires_init", False):
    return
  pretrained = config.get("pretrained", {})
  if config.init_from or config.get("allow_random_init", False) or (
      pretrained and (pretrained.get("beit") or pretrained.get("bert"))):
    return
  if workdir and storage.listdir(storage.join(workdir, "checkpoints")):
    return  # resumes this workdir's run, which was started from weights
  raise Refusal(
      "this fine-tuning recipe has no weights to start from: it would train BEiT and BERT "
      "from random weights. Pass --config.init_from=<a pretraining run's workdir or a "
      "VindLU .pth> or --config.pretrained.beit=<HF name> --config.pretrained.bert=<HF "
      "name>, or --config.allow_random_init=True if a random start is meant")


def check_config(config, mode: str) -> None:
  """Everything that can be checked before compiling: fields, data files, media roots."""
  validate_model_config(config.model)
  if config.batch_size <= 0:
    raise Refusal(f"batch_size={config.batch_size} must be positive")
  if mode != "prepare":
    check_run_settings(config, mode)
  if mode in ("train", "train_and_eval"):
    import jax  # noqa: PLC0415 (after main.py has joined the other hosts, if any)
    check_batch_over_devices(config, jax.device_count())
  corpora = []
  if mode in ("train", "train_and_eval"):
    if not config.data.train_corpora:
      raise Refusal("config.data.train_corpora is empty: nothing to train on")
    corpora += list(config.data.train_corpora)
  if mode in ("eval", "train_and_eval"):
    corpora += list(config.data.eval_corpora)
  loaded = []
  for corpus in corpora:
    for key in ("anno_file", "media_root"):
      path = corpus[key]
      exists = storage.isfile(path) if key == "anno_file" else os.path.isdir(path)
      if not exists:
        raise FileNotFoundError(
            f"{key} of corpus {corpus['name']!r} not found: {path} ({DATA_HELP}; set "
            f"--config.data_root to the folder that holds your data)")
    # Every entry is checked now (keys, types), so a malformed file fails before compiling.
    loaded.append(annotations_lib.load_corpus_from_config(corpus))
  # With data.source='prepared', every corpus must be prepared (and match its annotations).
  prepared_source.check_sources(config.data, corpora, loaded)
  if mode == "train_and_eval":
    num_train = len(config.data.train_corpora)
    warn_train_eval_overlap(loaded[:num_train], loaded[num_train:])


def warn_train_eval_overlap(train, evaluated) -> list[str]:
  """Warns (on stderr) for every eval corpus that holds videos of a training corpus, with
  the counts and a few names; returns the warnings.

  A warning, not an error: training on the test videos is sometimes meant (an overfitting
  sanity check, a pretraining corpus that happens to contain a benchmark's clips on
  purpose), but numbers from such an evaluation must not be reported as held-out ones,
  and without this line nothing says so. docs/data.md ("Train/test overlap").
  """
  import sys  # noqa: PLC0415
  warnings = []
  for ev in evaluated:
    for tr in train:
      count, examples = annotations_lib.shared_videos(tr, ev)
      if count:
        warnings.append(
            f"WARNING: eval corpus {ev.name!r} ({ev.anno_file}) shares {count:,} of its "
            f"{ev.num_videos:,} videos with train corpus {tr.name!r} ({tr.anno_file}), e.g. "
            f"{', '.join(repr(e) for e in examples)}: its retrieval numbers are not held-out "
            "numbers")
  for line in warnings:
    sys.stderr.write(line + "\n")
  return warnings
