r"""Train, evaluate or search with a recipe config.

  python main.py --config configs/demo.py --workdir runs/demo
  python main.py --config configs/didemo_ft.py --workdir runs/didemo --mode eval
  python main.py --config configs/msrvtt_ft.py:tiny --workdir /tmp/t --config.optimizer.lr=3e-5
  python main.py --config configs/msrvtt_ft.py --mode prepare --config.data_root=/data
  python main.py --config configs/webvid_pretrain.py --mode compile --config.compile.topology=v5e:2x4

Any config field can be overridden with --config.<field>=<value>; the config is locked,
so a misspelt field fails at once and lists the valid ones.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from t2v2t_jax import errors  # light: no JAX

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval",
                          ["train", "eval", "train_and_eval", "search", "serve", "prepare",
                           "compile"],
                          "train: train only; eval: evaluate the latest checkpoint (or "
                          "--config.init_from); train_and_eval: train, then evaluate; search: "
                          "rank videos for --query; serve: a local search page over the "
                          "same engine, on 127.0.0.1:--port; prepare: write the JPEG frame "
                          "shards of every train and eval corpus to data.prepared_dir "
                          "(resumable; then "
                          "train with --config.data.source=prepared); compile: compile the "
                          "recipe's programs for --config.compile.topology (a TPU slice, e.g. "
                          "v5e:2x4; no TPU needed) and print per-chip HBM use, whether it fits "
                          "and FLOPs (needs `pip install -e .[tpu]`).")
_QUERY = flags.DEFINE_string("query", None, "Text query for --mode search.")
_VIDEOS = flags.DEFINE_string("videos", None, "Folder of videos for --mode search (default: the "
                              "test split of the config's first eval corpus).")
_TOP = flags.DEFINE_integer("top", 5, "Results shown by --mode search (--mode serve: the "
                            "page's default).")
_PORT = flags.DEFINE_integer("port", 8000, "--mode serve: the port on 127.0.0.1 (0: any free "
                             "one; the URL is printed).", lower_bound=0, upper_bound=65535)
_EXPLAIN = flags.DEFINE_bool("explain", False, "--mode search: write a PNG per top result "
                             "showing how much each frame's T2V attention went to the text.")
_QUERIES = flags.DEFINE_string("queries", None, "--mode search: a text file of queries, one "
                               "per line, answered in turn with one model load (instead of "
                               "--query).")
_RERANK_TOKENS = flags.DEFINE_enum("rerank_tokens", "recompute", ["recompute", "float16"],
                                   "--mode search/serve: the rerank's video tokens are "
                                   "recomputed "
                                   "for the top k of each query (recompute) or stored in the "
                                   "library index at indexing (float16: no decoding at query "
                                   "time, T x N x D x 2 bytes a video on disk).")
flags.mark_flags_as_required(["config"])  # and --workdir, except for --mode prepare / compile


def _unknown_override(argv) -> str | None:
  """A readable message for the first --config.<path> that names no field, else None."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  if spec is None:
    return None
  from t2v2t_jax.recipes import load_recipe  # noqa: PLC0415 (no JAX before the flags parse)
  config = load_recipe(spec)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for key in path.split("."):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(walked) or "the config"
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a group)"
        return (f"Unknown config field --config.{path}: {where} has no field {key!r}.\n"
                f"Valid fields of {where}: {valid}")
      node = node[key]
      walked.append(key)
  return None


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (turned into a short message below)
    message = _unknown_override(argv[1:]) or f"{type(e).__name__}: {e}"
    sys.stderr.write(f"FATAL: {message}\n")
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that `--help` and flag errors come back without loading JAX.
  from input_pipeline import synthetic_autocreate  # noqa: PLC0415
  from t2v2t_jax import sharding  # noqa: PLC0415
  from t2v2t_jax.training import config_checks  # noqa: PLC0415

  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if mode == "compile":
    _compile(config)
    return
  if mode != "prepare" and not workdir:
    raise app.UsageError(f"--workdir is required for --mode {mode}")
  logging.set_verbosity(logging.WARNING)
  try:  # before anything starts: no data check, no compile, no other process waited for
    config_checks.check_paths(config, workdir, mode)
    config_checks.check_initialization(config, workdir, mode)
    if mode != "prepare":  # the numbers too: before a synthetic dataset is written for them
      config_checks.check_run_settings(config, mode)
  except (FileNotFoundError, ValueError) as e:  # every check here refuses a setting
    _refuse(e)
  sharding.maybe_initialize_distributed(config)
  try:
    if mode in ("train", "train_and_eval"):  # before a synthetic dataset is written for it
      import jax  # noqa: PLC0415 (the device count is known once the hosts have joined)
      config_checks.check_batch_over_devices(config, jax.device_count())
    synthetic_autocreate.create_if_missing(config)
    config_checks.check_config(config, mode)  # fails before any compilation
    if mode == "prepare":
      from input_pipeline import prepare  # noqa: PLC0415
      prepare.check_config(config.data)  # every annotation file and setting, before any work
  except (FileNotFoundError, ValueError) as e:  # model fields, settings, data files
    _refuse(e)

  try:
    _run(config, workdir, mode)
  except errors.anticipated() as e:  # pylint: disable=catching-non-exception (a tuple of types)
    _refuse(e)


def _refuse(error: BaseException, code: int = 2):
  """`FATAL: <file or field>: <reason>` on one line (a multi-line message would break
  grepping a log for FATAL), then exit with `code`."""
  sys.stderr.write(f"FATAL: {errors.one_line(error)}\n")
  sys.exit(code)


def _compile(config):
  """--mode compile: no data, no workdir; every failure is one line that says what to do."""
  from t2v2t_jax.models.config import validate_model_config  # noqa: PLC0415
  from t2v2t_jax.training import compile_plan, tpu_topology  # noqa: PLC0415
  if not config.compile.topology:
    sys.stderr.write("FATAL: --mode compile needs --config.compile.topology, e.g. v5e:1x1 "
                     "(Colab), v5e:2x4, v6e:2x4 or v4:2x2x1\n")
    sys.exit(2)
  try:
    validate_model_config(config.model)
    compile_plan.plan(config)
  except (tpu_topology.TopologyError, ValueError) as e:
    _refuse(e)


def _run(config, workdir, mode):
  if mode == "prepare":
    from input_pipeline import prepare  # noqa: PLC0415
    try:
      prepare.prepare_from_config(config.data)
    except prepare.PrepareInterrupted as e:  # finished shards are kept: rerun to resume
      _refuse(e, code=1)
  elif mode in ("train", "train_and_eval"):
    from t2v2t_jax.training import preemption, train  # noqa: PLC0415
    try:
      train.train_and_evaluate(config, workdir, evaluate_at_end=mode == "train_and_eval")
    except preemption.Preempted as e:  # saved; every process stops with the same code
      print(e, flush=True)
      sys.exit(preemption.EXIT_CODE)
  elif mode == "eval":
    from t2v2t_jax.evaluation import evaluate  # noqa: PLC0415
    evaluate.evaluate_checkpoint(config, workdir)
  elif mode == "serve":
    from t2v2t_jax.evaluation import serve  # noqa: PLC0415
    serve.serve(config, workdir, videos=_VIDEOS.value, port=_PORT.value, top=_TOP.value,
                tokens=_RERANK_TOKENS.value)  # a taken port: PortUnavailable, a Refusal
  else:
    if bool(_QUERY.value) == bool(_QUERIES.value):
      raise app.UsageError("--mode search needs --query or --queries FILE (one of them)")
    from t2v2t_jax.evaluation import search  # noqa: PLC0415
    if _QUERIES.value:
      try:
        queries = search.read_queries(_QUERIES.value)
      except (OSError, ValueError) as e:  # unreadable, not UTF-8, or empty
        _refuse(f"--queries {_QUERIES.value}: {e}" if not str(e).startswith("--queries")
                else e)
      search.search_queries(config, workdir, queries, videos=_VIDEOS.value, top=_TOP.value,
                            explain=_EXPLAIN.value, tokens=_RERANK_TOKENS.value)
    else:
      search.search(config, workdir, _QUERY.value, videos=_VIDEOS.value, top=_TOP.value,
                    explain=_EXPLAIN.value, tokens=_RERANK_TOKENS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
