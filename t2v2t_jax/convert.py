r"""Convert checkpoints between VindLU (PyTorch) and this project (Orbax).

  # VindLU .pth -> an Orbax checkpoint that --config.init_from=OUT_DIR loads
  python -m t2v2t_jax.convert vindlu IN.pth OUT_DIR [--config configs/x.py[:arg]] [--mode t2v2t]

  # our checkpoint (a run's workdir, its checkpoints/ folder, or a converted folder)
  # -> a VindLU state dict, to evaluate our weights with the PyTorch original
  python -m t2v2t_jax.convert --to vindlu OUR_CKPT_DIR OUT.pth [--naming finetune|pretrain]
      [--drop-t2v] [--config configs/x.py[:arg]]

Import: the model is the recipe's `config.model` when `--config` is given (then the
checkpoint must fit it: relative position tables and the temporal embedding are resized,
anything else that does not fit is an error), else an architecture inferred from the
checkpoint's shapes (`vindlu_config.infer_model_config`) with fusion mode `--mode` (default
t2v2t). OUT_DIR becomes an Orbax CheckpointManager folder `OUT_DIR/0/state` holding
`{'params': nnx.State}` (no optimizer state: use it as `--config.init_from`, not as a
`--workdir` to resume), plus `OUT_DIR/vindlu_import.txt` with the import table.

Export: `--naming finetune` (default) writes `text_encoder.*` keys and no MLM head, as
VindLU's retrieval model and its evaluation expect; `pretrain` writes
`text_encoder.bert.*` and `text_encoder.cls.predictions.*`. The file is
`torch.save({'model': state_dict})`. T2V blocks are left out when their gates are 0;
otherwise `--drop-t2v` is required (VindLU then scores differently from our model).

torch is needed (the optional extra `convert`).

Input the converter recognises as unusable (a missing or damaged file, a checkpoint that
does not fit, an output folder that is not empty) ends it with one line, `FATAL: <file>:
<reason>`, and status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import os
import sys

from t2v2t_jax import errors
from t2v2t_jax.errors import Refusal, one_line
from t2v2t_jax.recipes import load_recipe

IMPORT_REPORT = "vindlu_import.txt"


def save_params_checkpoint(directory: str, params_state, *, step: int = 0) -> str:
  """Write `{'params': params_state}` as item `state` of a CheckpointManager at `directory`."""
  import orbax.checkpoint as ocp

  from t2v2t_jax.checkpoints import run_checkpoints

  directory = os.path.abspath(directory)
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} exists and is not empty; choose a new output folder")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                                  item_names=("state",))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params_state})))
  manager.wait_until_finished()
  manager.close()
  # The integrity record a training run writes for each step: `init_from` this folder
  # checks it as resume does (without one the step would only count as unverified).
  run_checkpoints.write_integrity(os.path.join(directory, str(step)))
  return directory


def vindlu_to_orbax(in_path: str, out_dir: str, *, model_config=None, fusion_mode: str | None = None,
                    seed: int = 0, verbose: bool = True):
  """Import a VindLU `.pth` and save it as an Orbax checkpoint. Returns the import report."""
  from flax import nnx

  from t2v2t_jax.checkpoints import vindlu, vindlu_config
  from t2v2t_jax.checkpoints.params import assign_into
  from t2v2t_jax.models.t2v2t import create_model

  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not empty; choose a new output folder")
  ckpt = vindlu.read_vindlu_checkpoint(in_path)
  if model_config is None:
    model_config = vindlu_config.infer_model_config(ckpt.state, fusion_mode or "t2v2t")
  elif fusion_mode:
    model_config.fusion.mode = fusion_mode
  # Keys, dtypes and shapes against the model's abstract shapes: a crafted file is refused
  # before the model (gigabytes at base size) is built. Cached, so import_vindlu repeats nothing.
  vindlu.check_vindlu_state(ckpt.state, model_config, source=ckpt.source)
  model = create_model(model_config, seed=seed)
  values, report = vindlu.import_vindlu(ckpt.state, model_config, model=model, source=ckpt.source)
  report.upcast = ckpt.upcast
  assign_into(model, values, source=ckpt.source)
  _, params_state = nnx.split(model, nnx.Param)
  save_params_checkpoint(out_dir, params_state)
  text = (report.table() + f"\nmodel: {vindlu_config.describe_config(model_config)}; fusion "
          f"mode {model_config.fusion.mode!r}\n")
  with open(os.path.join(out_dir, IMPORT_REPORT), "w") as f:
    f.write(text)
  if verbose:
    print(text, end="", flush=True)
    print(f"wrote {os.path.abspath(out_dir)} (use --config.init_from={out_dir})", flush=True)
  return report


def orbax_to_vindlu(ckpt_dir: str, out_path: str, *, naming: str = "finetune",
                    drop_t2v: bool = False, model_config=None, verbose: bool = True):
  """Export our parameters (latest step of `ckpt_dir`) to a VindLU `.pth`. Returns the report."""
  from t2v2t_jax.checkpoints import restore, vindlu_export
  from t2v2t_jax.checkpoints.vindlu_keys import VindluCheckpointError

  if ckpt_dir.endswith(restore.TORCH_SUFFIXES):
    raise Refusal(f"{ckpt_dir!r}: export reads one of our checkpoint folders, not a .pth")
  # With --config, the stored shapes are compared with the model's before anything is read.
  params = restore.params_from(ckpt_dir, model_config)
  if model_config is not None:
    from t2v2t_jax.checkpoints.params import param_shapes
    from t2v2t_jax.models.t2v2t import abstract_model
    want = param_shapes(abstract_model(model_config))
    diff = sorted(set(want) ^ set(params))
    bad = [f"{p}: config {want[p]} vs checkpoint {params[p].shape}" for p in want
           if p in params and tuple(params[p].shape) != tuple(want[p])]
    if diff or bad:
      raise VindluCheckpointError(
          f"{ckpt_dir} does not match --config: " + "; ".join(
              [f"only in one of them: {', '.join(diff[:20])}"] * bool(diff) + bad[:20]))
  state, report = vindlu_export.export_vindlu(params, naming=naming, drop_t2v=drop_t2v)
  vindlu_export.save_vindlu_checkpoint(state, out_path)
  if verbose:
    print(report.table(), flush=True)
    print(f"wrote {out_path} ({len(state)} tensors)", flush=True)
  return report


def _parser():
  p = argparse.ArgumentParser(
      prog="python -m t2v2t_jax.convert",
      description="VindLU .pth -> Orbax (`vindlu IN.pth OUT_DIR`) or back "
                  "(`--to vindlu OUR_CKPT_DIR OUT.pth`).")
  p.add_argument("paths", nargs="+", help="vindlu IN.pth OUT_DIR | (with --to vindlu) CKPT_DIR OUT.pth")
  p.add_argument("--to", choices=["vindlu"], help="export our checkpoint to this format")
  p.add_argument("--config", help="recipe configs/x.py[:arg] whose model to use / check against")
  p.add_argument("--mode", choices=["v2t", "t2v2t", "t2v2t_naive", "joint"],
                 help="import: fusion mode of the target model (overrides the config's)")
  p.add_argument("--seed", type=int, default=0, help="import: seed of newly initialised params")
  p.add_argument("--naming", choices=["finetune", "pretrain"], default="finetune",
                 help="export: VindLU key naming (default finetune: what its retrieval eval loads)")
  p.add_argument("--drop-t2v", action="store_true",
                 help="export: leave out T2V blocks even if their gates are not 0")
  return p


def main(argv=None) -> int:
  """Runs the conversion; a refusal is one `FATAL: <file>: <reason>` line and status 2."""
  args = _parser().parse_args(argv)
  try:
    return _convert(args)
  except errors.anticipated() as e:  # pylint: disable=catching-non-exception (a tuple of types)
    print(f"FATAL: {one_line(e)}", file=sys.stderr, flush=True)
    return 2


def _convert(args) -> int:
  model_config = load_recipe(args.config).model if args.config else None
  if args.to == "vindlu":
    if len(args.paths) != 2:
      _parser().error("--to vindlu takes OUR_CKPT_DIR OUT.pth")
    orbax_to_vindlu(args.paths[0], args.paths[1], naming=args.naming, drop_t2v=args.drop_t2v,
                    model_config=model_config)
    return 0
  if len(args.paths) != 3 or args.paths[0] != "vindlu":
    _parser().error("import takes: vindlu IN.pth OUT_DIR")
  vindlu_to_orbax(args.paths[1], args.paths[2], model_config=model_config, fusion_mode=args.mode,
                  seed=args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
