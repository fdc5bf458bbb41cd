r"""Writes the config reference: every field, its default, what it does, and what each
recipe changes.

  python -m t2v2t_jax.config_reference > docs/config_reference.md

Descriptions come from the code that creates the fields: the trailing `# ...` comment of
each assignment in `configs/common.py`, `t2v2t_jax/models/config.py` and
`t2v2t_jax/training/optimizer.py`, the field list in the docstring of
`input_pipeline/config.py` and the `Args:` of `corpus_config`. Fields with neither (or with
a comment too short to stand alone) are described in `DESCRIPTIONS` below, which takes
precedence. `tests/test_config_reference.py` fails when a field has no description or
when `docs/config_reference.md` is not what this module prints.
"""

from __future__ import annotations

import ast
import inspect
import io
import os
import re
import sys
import tokenize
from pathlib import Path

import ml_collections

from t2v2t_jax.recipes import recipe_module
from t2v2t_jax.tree_paths import flatten_config

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT_MARK = "{data_root}"

# (file, function building the config, prefix of its fields)
COMMENTED_SOURCES = (
    ("configs/common.py", "base_config", ""),
    ("t2v2t_jax/models/config.py", "model_config", "model."),
    ("t2v2t_jax/training/optimizer.py", "optimizer_config", "optimizer."),
    ("input_pipeline/config.py", "data_config", "data."),
)

DESCRIPTIONS = {
    # Run.
    "seed": "Seed of the model initialisation, dropout, hard negatives and masking, and of the data order and augmentation.",
    "num_frames": "Frames sampled per training clip (SPEC 7: 4 pretraining, 12 fine-tuning). Image corpora always give 1.",
    "log_every": "Steps between console lines and TensorBoard / `metrics.jsonl` rows (written by process 0).",
    "checkpoint_every": "Steps between Orbax checkpoints (model, optimizer, step, RNG and data iterator); one is also written at the end.",
    "total_steps": "Optimizer updates of the run; 0: `optimizer.epochs` x steps per epoch (the learning-rate schedule follows this number).",
    "data_root": "Folder that the recipes' annotation files and media folders are relative to (`{data_root}` in the recipe tables).",
    "eval_every": "Steps between evaluations during training; 0: evaluate only at the end.",
    "init_from": "Parameters to start from when the workdir has no checkpoint: a run's workdir or checkpoint folder, or a VindLU `.pth` (converted on the fly, without torch), local or `gs://`; read and checked before the data pipeline starts. The optimizer starts fresh.",
    "requires_init": "Set by the fine-tuning recipes: a run that starts (no checkpoint in the workdir to resume) with neither `init_from` nor `pretrained` weights is refused before any work, since it would fine-tune random BEiT and BERT weights for hours.",
    "allow_random_init": "True lets a `requires_init` recipe start from random weights on purpose (`:tiny` sets it: no pretrained weights exist at those sizes).",
    "eval_every_epochs": "> 0: evaluate every that many epochs during training (VindLU's protocol: 1, every epoch); overrides `eval_every`. The final step is evaluated at the end either way.",
    "best_key": "`<eval corpus>/<metric>` whose highest value selects the best evaluated step (VindLU's `stop_key`, e.g. `didemo_val/r_mean`: mean of R@1/5/10 over both directions, reranked): that step is saved, kept beside the latest `keep_checkpoints` and named in `checkpoints/best.json`. Empty: no selection (the last step is used).",
    "pick_checkpoint": "Which step `--mode eval`, `--mode search` and `init_from` read from a run folder: `best` (the step in `checkpoints/best.json` when the run marked one, else the latest) or `latest`.",
    "start_over": "A workdir that holds an earlier training run (training steps logged in `metrics.jsonl`, or damaged checkpoints set aside) but no usable checkpoint is refused, so that a new run neither mixes its metrics with the old ones nor silently drops the old progress; True starts from scratch there instead, after moving the earlier run's logs to `workdir/previous_runs/<n>/`.",
    "keep_checkpoints": "How many of the latest checkpoints are kept in `workdir/checkpoints` (at least 1: Orbax would otherwise delete every one, the final one included). A damaged latest step is set aside in `workdir/checkpoints_damaged/` and the run resumes from the one before, so keeping 2 or more is what makes that possible.",
    # --mode compile (t2v2t_jax/training/compile_plan.py).
    "compile.topology": "TPU slice that `--mode compile` compiles the recipe for, on any host without a TPU (needs `pip install -e \".[tpu]\"`): `v5e:1x1` (Colab), `v5e:2x4`, `v6e:2x4`, `v4:2x2x1`, ... Multi-host slices (e.g. `v5e:4x4`) compile from one process. Also `h100` / `h200`: one GPU, compiled without a GPU through the CUDA plugin of the same JAX version, kept outside the venv in `$T2V2T_CUDA_PLUGIN_DIR` (see docs/benchmarks.md, \"GPU, compiled\"). Every program is printed with its census (kernels, copies, reductions, collectives, roofline; compiled figures).",
    "compile.eval_programs": "`--mode compile` also compiles the evaluation programs: the video and text encoders at the eval batch and frames, and the rerank scorer at its pair batch.",
    "compile.find_max_batch": "`--mode compile` also searches the largest per-device training batch whose step fits the chip's HBM (a few more compiles: memory is close to linear in the batch).",
    "compile.json_out": "`--mode compile` appends its results (per program: bytes per device, FLOPs, compile time; the largest batch) as one JSON line to this file.",
    "model.remat": "Per-layer rematerialisation policy: 'none' keeps every activation, 'full' recomputes each layer in the backward pass (least memory), 'save_dots' keeps the dense projections' outputs and recomputes the rest. True / False are read as 'full' / 'none'.",
    "model.scan_layers": "Scan each stack of identical layers (one compiled layer body; parameters stay stored per layer): 'auto' scans on TPU and unrolls on GPU and CPU, where the scanned step measured 24% (H200) and 14% (2-core CPU) slower (docs/benchmarks.md); 'on' / 'off' force it.",
    # Model.
    "model.vision.variant": "Size name of the video encoder, `<size>/<patch>` (`B/16`, `S/16`, `Ti/16`, `test/16`); sets width, depth, heads, MLP and patch below.",
    "model.vision.width": "Hidden width of the video encoder (from the variant).",
    "model.vision.depth": "Number of BEiT layers (from the variant).",
    "model.vision.num_heads": "Attention heads per layer (from the variant).",
    "model.vision.mlp_dim": "Hidden width of each layer's MLP (from the variant).",
    "model.vision.patch_size": "Side of the square patches, in pixels (from the variant).",
    "model.vision.num_frames": "Frames the temporal position embedding holds: set it to the training frame count (more frames at inference are interpolated).",
    "model.vision.image_size": "Side of the square input frames, in pixels; the relative position bias is interpolated for sizes other than the checkpoint's.",
    "model.vision.layer_scale_init": "Initial value of the layer-scale vectors (lambda_1, lambda_2) of new layers.",
    "model.vision.layer_norm_eps": "Epsilon of every LayerNorm of the video encoder.",
    "model.vision.dropout_rate": "Dropout in the video encoder (BEiT: 0).",
    "model.text.variant": "Size name of the text encoder (`base`, `small`, `tiny`, `test`); sets width, layers, heads, MLP and fusion_layer below.",
    "model.text.width": "Hidden width of the text and fusion encoder (from the variant).",
    "model.text.num_layers": "BERT layers in all; the first `fusion_layer` encode text, the rest fuse it with the video.",
    "model.text.num_heads": "Attention heads per layer (from the variant).",
    "model.text.mlp_dim": "Hidden width of each layer's feed-forward block (from the variant).",
    "model.text.fusion_layer": "First layer of the fusion encoder (BERT-base: 9, so layers 0-8 are the text encoder and 9-11 fuse). The VTC text feature is the [CLS] output of layer `fusion_layer - 1`.",
    "model.text.vocab_size": "Rows of the word-embedding matrix; must be at least the tokenizer's vocabulary.",
    "model.text.max_position": "Rows of the position-embedding table (longest possible text).",
    "model.text.type_vocab_size": "Rows of BERT's token-type embedding (kept for checkpoint compatibility).",
    "model.text.layer_norm_eps": "Epsilon of every LayerNorm of the text and fusion encoder.",
    "model.fusion.mode": "How text and video are fused: `v2t` (VindLU: text cross-attends to the video), `t2v2t` (the paper: frames first attend to the text with bypass cross-attention), `t2v2t_naive` (the same without the bypass), `joint` (self-attention over both).",
    "model.fusion.t2v_placement": "DECISION (SPEC 3): `once` = one T2V bypass block before the fusion layers, on the last text-encoder state; `per_layer` = a T2V block inside every fusion layer.",
    "model.fusion.layer_order": "DECISION (SPEC 3): order inside a fusion layer; `vindlu` = self-attention, cross-attention, FFN (VindLU weights load unchanged), `cross_first` = the poster's literal order.",
    "model.fusion.t2v_residual": "DECISION (SPEC 3): `gated` = the T2V block adds its output through a learnable gate initialised to 0 (a VindLU checkpoint scores as VindLU at step 0); `post_ln` = plain BERT post-LN residuals.",
    "model.fusion.keep_frame_cls": "DECISION (SPEC 3): keep each frame's CLS token among the video tokens of the fusion (197 per frame, as VindLU); False drops it (196).",
    "model.fusion.t2v_ffn": "DECISION (SPEC 3): the T2V block has its own feed-forward block (with a gated residual).",
    "model.embed_dim": "Width of the VTC embedding space (`vision_proj`, `text_proj`).",
    "model.temp_init": "Initial VTC temperature (learnable).",
    "model.temp_min": "The temperature is clamped to [temp_min, temp_max] at every step.",
    "model.temp_max": "The temperature is clamped to [temp_min, temp_max] at every step.",
    # Data.
    "data.failure_fraction": "Stop the run when more than this fraction of the samples read so far failed to decode (once `failure_min_samples` were read).",
    "data.failure_min_samples": "Samples to read before `failure_fraction` is checked.",
    # Optimizer.
    "optimizer.epochs": "Epochs of the run (may be fractional); sets the number of steps unless `total_steps` is given.",
    "optimizer.weight_decay": "AdamW decoupled weight decay (multiplied by the learning rate), applied by VindLU's rule: all but 1-D parameters and biases.",
    "optimizer.b1": "AdamW beta1.",
    "optimizer.b2": "AdamW beta2.",
    "optimizer.eps": "AdamW epsilon.",
    # Losses.
    "loss_weights.vtc": "Weight of the video-text contrastive loss over the global batch (0 skips it).",
    "loss_weights.vtm": "Weight of the video-text matching loss with hard negatives (0 skips it).",
    "loss_weights.mlm": "Weight of the masked-language-modelling loss (pretraining only; 0 skips it).",
    "vtm_negatives": "Where VTM hard negatives come from: 'global' (the whole batch) or 'per_device' (each device's own rows, as VindLU drew them: to reproduce its objective).",
    # Mesh.
    "mesh.data": "Size of the data-parallel mesh axis; -1 takes every device not used by `fsdp`. The batch is split over data x fsdp.",
    "mesh.fsdp": "Size of the FSDP axis: parameters and optimizer state of at least `fsdp_min_size` elements are split over it (1: replicated).",
    "mesh.fsdp_min_size": "Smaller parameters stay replicated under FSDP.",
    # Multi-host.
    "multihost.enabled": "Call `jax.distributed.initialize` at start-up (one process per host; see docs/scaling.md).",
    "multihost.coordinator_address": "`host:port` of process 0; empty: detected by JAX (TPU pods, SLURM, Open MPI).",
    "multihost.num_processes": "Number of processes; -1: detected by JAX.",
    "multihost.process_id": "This process's index, 0 on the coordinator; -1: detected by JAX.",
    # Evaluation.
    "eval.corpora_enabled": "Evaluate `data.eval_corpora` at the end of training (and every `eval_every` steps).",
    "eval.video_batch_size": "Videos embedded per step, over all processes.",
    "eval.text_batch_size": "Texts embedded per step.",
    # Pretrained weights.
    "pretrained.beit": "Hugging Face name or folder of BEiT weights for the video encoder (used when starting without a checkpoint or `init_from`), e.g. `microsoft/beit-base-patch16-224-pt22k-ft22k`.",
    "pretrained.bert": "Hugging Face name or folder of BERT weights for the text and fusion encoders, e.g. `bert-base-uncased`.",
    # Synthetic data (recipes that train on it: demo and any `:tiny`).
    "synthetic.create_if_missing": "Create the synthetic dataset in `data_root` before the run if the folder holds none (process 0 writes, the others wait).",
    "synthetic.num_train": "Training videos of the synthetic dataset (3 captions each).",
    "synthetic.num_val": "Validation videos of the synthetic dataset.",
    "synthetic.num_test": "Test videos of the synthetic dataset (the retrieval eval set).",
    "synthetic.size": "Frame side of the synthetic videos, in pixels.",
    "synthetic.fps": "Frame rate of the synthetic videos.",
    "synthetic.num_frames": "Frames per synthetic video.",
    "synthetic.seed": "Seed of the synthetic dataset (same seed, same files).",
}

SECTIONS = (
    ("", "Run"),
    ("model", "Model"),
    ("model.vision", "Model: video encoder (BEiT with temporal attention)"),
    ("model.text", "Model: text and fusion encoder (BERT)"),
    ("model.fusion", "Model: fusion"),
    ("data", "Data"),
    ("optimizer", "Optimizer and learning-rate schedule"),
    ("loss_weights", "Loss weights"),
    ("mesh", "Device mesh"),
    ("multihost", "Multi-host"),
    ("eval", "Retrieval evaluation"),
    ("pretrained", "Pretrained weights"),
    ("synthetic", "Synthetic data"),
)

RECIPES = ("demo", "webvid_pretrain", "webvid_cc3m_pretrain", "msrvtt_ft", "didemo_ft", "anet_ft")


# ------------------------------------------------------------------ reading descriptions


def _attribute_path(node) -> list[str] | None:
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return names[::-1]


def assignment_comments(path: Path, function: str, prefix: str) -> dict[str, str]:
  """{field: trailing comment} for `c.a.b = value  # comment` inside `function`."""
  source = path.read_text()
  comments = {tok.start[0]: tok.string.lstrip("#").strip()
              for tok in tokenize.generate_tokens(io.StringIO(source).readline)
              if tok.type == tokenize.COMMENT}
  tree = ast.parse(source)
  func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
  out = {}
  for node in ast.walk(func):
    if isinstance(node, ast.Assign) and node.end_lineno in comments:
      for target in node.targets:
        names = _attribute_path(target)
        if names:
          out[prefix + ".".join(names)] = comments[node.end_lineno]
  return out


def docstring_fields(doc: str, heading: str, prefix: str) -> dict[str, str]:
  """The `  name   description` list that follows `heading` in a docstring."""
  lines = doc.splitlines()
  start = next(i for i, line in enumerate(lines) if heading in line) + 1
  out, key = {}, None
  for line in lines[start:]:
    if not line.strip():
      continue
    if not line.startswith("  "):
      break
    match = re.match(r"^  (\w+)\s{2,}(.*)$", line)
    if match:
      key = prefix + match.group(1)
      out[key] = match.group(2).strip()
    elif key:
      out[key] += " " + line.strip()
  return out


def args_section(func, prefix: str) -> dict[str, str]:
  """The `Args:` entries of a Google-style docstring."""
  doc = inspect.getdoc(func)
  lines = doc.splitlines()
  start = lines.index("Args:") + 1
  out, key = {}, None
  for line in lines[start:]:
    if line.strip() and not line.startswith("  "):
      break
    match = re.match(r"^  (\w+): (.*)$", line)
    if match:
      key = prefix + match.group(1)
      out[key] = match.group(2).strip()
    elif key and line.strip():
      out[key] += " " + line.strip()
  return out


def descriptions() -> dict[str, str]:
  from input_pipeline import config as data_config_lib  # noqa: PLC0415
  out = {}
  for rel, function, prefix in COMMENTED_SOURCES:
    out.update(assignment_comments(REPO / rel, function, prefix))
  out.update(docstring_fields(data_config_lib.__doc__, "Fields of `data_config()`", "data."))
  out.update(DESCRIPTIONS)
  return out


# ------------------------------------------------------------------ reading configs


def recipe_config(name: str, arg: str | None = None):
  """(module, config) of `configs/<name>.py` with `arg`."""
  module = recipe_module(REPO / "configs" / f"{name}.py")
  return module, module.get_config(arg)


def format_value(value) -> str:
  if isinstance(value, str):
    return f'`"{value}"`'
  if isinstance(value, (list, tuple)) and value and isinstance(value[0], ml_collections.ConfigDict):
    return ", ".join(f'`{c["name"]}`' for c in value)
  return f"`{value!r}`"


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def _section_of(field: str) -> str:
  parts = field.split(".")
  for depth in (2, 1):
    if len(parts) > depth and ".".join(parts[:depth]) in dict(SECTIONS):
      return ".".join(parts[:depth])
  return ""


def field_table() -> tuple[dict, dict]:
  """(fields {name: (default, origin)}, descriptions); the defaults of `base_config()`,
  plus fields only recipes add (the synthetic-data settings, shown with the demo's value)."""
  from configs import common  # noqa: PLC0415
  fields = {k: (v, "") for k, v in flatten_config(common.base_config()).items()}
  _, demo = recipe_config("demo")
  for key, value in flatten_config(demo).items():
    fields.setdefault(key, (value, "demo"))
  return fields, descriptions()


def missing_descriptions() -> list[str]:
  fields, desc = field_table()
  return sorted(k for k in fields if not desc.get(k))


# ------------------------------------------------------------------ the page


def render() -> str:
  from input_pipeline.config import corpus_config  # noqa: PLC0415
  fields, desc = field_table()
  out = [
      "# Config reference",
      "",
      "<!-- Generated by `python -m t2v2t_jax.config_reference > docs/config_reference.md`;",
      "     do not edit by hand (tests/test_config_reference.py checks that it is current). -->",
      "",
      "Every run is configured by one recipe file (`configs/*.py`); any field below can be",
      "changed on the command line with `--config.<field>=<value>`, e.g.",
      "`--config.optimizer.lr=3e-5 --config.mesh.fsdp=4`. The config is locked, so a misspelt",
      "field fails at once. Lists (the corpora) cannot be set from the command line: write a",
      "short recipe file that builds on a paper recipe (see `notebooks/colab_tpu.ipynb`,",
      "section 6). Defaults are those of `configs/common.py:base_config()`; the",
      "[recipe tables](#recipes) list what each recipe changes. DECISION marks a choice the",
      "paper leaves open (SPEC.md).",
  ]
  by_section = {}
  for key in sorted(fields):
    by_section.setdefault(_section_of(key), []).append(key)
  for section, title in SECTIONS:
    keys = by_section.get(section, [])
    if not keys:
      continue
    out += ["", f"## {title}" + (f" (`{section}`)" if section else ""), "",
            "| field | default | description |", "|---|---|---|"]
    for key in keys:
      value, origin = fields[key]
      default = format_value(value) + (f" ({origin})" if origin else "")
      out.append(f"| `{key}` | {_cell(default)} | {_cell(desc.get(key, ''))} |")

  # Corpus entries of data.train_corpora / data.eval_corpora.
  signature = inspect.signature(corpus_config)
  args = args_section(corpus_config, "")
  out += ["", "## Corpus entries (`data.train_corpora`, `data.eval_corpora`)", "",
          "Each entry is made by `input_pipeline.config.corpus_config(name, anno_file, "
          "media_root, ...)`.", "", "| field | default | description |", "|---|---|---|"]
  for name, param in signature.parameters.items():
    default = "required" if param.default is inspect.Parameter.empty else format_value(param.default)
    out.append(f"| `{name}` | {_cell(default)} | {_cell(args.get(name, ''))} |")

  out += ["", "## Recipes", "",
          "Fields each recipe sets differently from the defaults above; corpus paths are",
          f"relative to `data_root` (shown as `{DATA_ROOT_MARK}`)."]
  for name in RECIPES:
    out += _recipe_section(name, fields)
  out += _tiny_section()
  return "\n".join(out) + "\n"


def _recipe_section(name: str, fields: dict) -> list[str]:
  module, config = recipe_config(name)
  doc_lines = (module.__doc__ or "").strip().splitlines()
  command = _first_command(doc_lines)
  out = ["", f"### `configs/{name}.py`", "", doc_lines[0] if doc_lines else ""]
  if command:
    out += ["", f"`{command}`"]
  out += ["", "| field | default | this recipe |", "|---|---|---|"]
  for key, value in flatten_config(config).items():
    if key.startswith("data.") and key.endswith("_corpora"):
      continue
    default = fields.get(key, (None, ""))[0]
    if key not in fields or value != default:
      out.append(f"| `{key}` | {_cell(format_value(default))} | {_cell(format_value(value))} |")
  config.data_root = DATA_ROOT_MARK
  for kind in ("train_corpora", "eval_corpora"):
    for corpus in config.data[kind]:
      options = ", ".join(f"{k}={corpus[k]!r}" for k in ("kind", "paragraph", "max_seconds", "max_len")
                          if corpus[k] not in (None, False, "video"))
      out.append(f"| `data.{kind}` | | `{corpus['name']}`: `{corpus['anno_file']}`, media in "
                 f"`{corpus['media_root']}`" + (f" ({options})" if options else "") + " |")
  return out


def _first_command(doc_lines: list[str]) -> str:
  """The first `python main.py ...` command of a docstring, continuation lines joined."""
  parts = []
  for line in doc_lines:
    line = line.strip()
    if parts or line.startswith("python main.py"):
      parts.append(line.rstrip("\\").strip())
      if not line.endswith("\\"):
        break
  return " ".join(parts)


def _tiny_section() -> list[str]:
  _, full = recipe_config("msrvtt_ft")
  _, tiny = recipe_config("msrvtt_ft", "tiny")
  full_flat, tiny_flat = flatten_config(full), flatten_config(tiny)
  out = ["", "### The `:tiny` argument", "",
         "`--config configs/<recipe>.py:tiny` runs any recipe at the tiniest sizes on the",
         "synthetic dataset, for tests and quick local runs. Only sizes change: the recipe's",
         "compute dtype, remat, fusion, initialisation and loss choices stay. Changes to",
         "`msrvtt_ft`:", "",
         "| field | msrvtt_ft | msrvtt_ft:tiny |", "|---|---|---|"]
  for key, value in tiny_flat.items():
    if key.startswith("data.") and key.endswith("_corpora"):
      continue
    if key not in full_flat or full_flat[key] != value:
      before = format_value(full_flat[key]) if key in full_flat else "(absent)"
      out.append(f"| `{key}` | {_cell(before)} | {_cell(format_value(value))} |")
  out.append("| `data.train_corpora`, `data.eval_corpora` | the recipe's | `synthetic_train`, "
             "`synthetic_test` (`{data_root}/train.json`, `test.json`) |")
  return out


def main() -> None:
  missing = missing_descriptions()
  if missing:
    print(f"Fields without a description (add them to DESCRIPTIONS): {missing}", file=sys.stderr)
    sys.exit(1)
  sys.stdout.write(render())


if __name__ == "__main__":
  sys.path.insert(0, os.fspath(REPO))
  main()
