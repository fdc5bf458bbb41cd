"""Fields every recipe shares, and the `:tiny` argument that shrinks any recipe.

A recipe's `get_config(arg)` builds on `base_config()`; `arg` is a comma-separated list:
  tiny             the tiniest sizes (vision 'test/16' at 32 px, text 'test'), 2 frames,
                   batch 4, a few steps, a small synthetic dataset (data/synthetic_tiny,
                   created on first use) unless data_root is set: for tests and quick
                   local runs of any recipe. Only sizes shrink: the recipe's compute dtype,
                   remat, layer scanning, attention, fusion, temperature, initialisation,
                   dropout and loss choices stay (`msrvtt_ft.py:tiny` trains in bfloat16
                   with remat, like `msrvtt_ft.py`).
  mode=<fusion>    fusion mode: v2t | t2v2t | t2v2t_naive | joint.
"""

from __future__ import annotations

import ml_collections

from input_pipeline.config import corpus_config, data_config
from t2v2t_jax.models.config import model_config
from t2v2t_jax.training.optimizer import optimizer_config

# `:tiny` runs get their own small synthetic set, apart from the demo's `data/synthetic`
# (a folder holds one dataset; input_pipeline/synthetic_autocreate.py refuses one made with
# other settings).
SYNTHETIC_DEFAULT_ROOT = "data/synthetic_tiny"


def parse_arg(arg: str | None) -> dict:
  out = {}
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    out[key] = value if value else True
  unknown = set(out) - {"tiny", "mode"}
  if unknown:
    raise ValueError(f"Unknown config argument(s) {sorted(unknown)}; use 'tiny' and/or 'mode=<fusion>'.")
  return out


def base_config(*, vision="B/16", text="base", fusion_mode="t2v2t") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_root = "data"                 # every corpus path below is relative to this folder
  c.model = model_config(vision, text, fusion_mode)
  c.data = data_config()
  c.data.prepared_dir = c.get_ref("data_root") + "/prepared"  # shards of `--mode prepare`
  c.optimizer = optimizer_config()
  c.loss_weights = ml_collections.ConfigDict(dict(vtc=1.0, vtm=1.0, mlm=1.0))
  c.vtm_negatives = "global"           # 'global' | 'per_device' (VindLU's scope: each device's rows)
  c.batch_size = 512                   # global batch (all devices, all hosts)
  c.num_frames = 4                     # training frames
  c.total_steps = 0                    # 0: optimizer.epochs x steps per epoch
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 18))
  c.multihost = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=-1, process_id=-1))
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 0                     # 0: evaluate only at the end of training
  c.init_from = ""                     # a run's workdir / checkpoint folder, or a VindLU .pth
  c.start_over = False                 # start from scratch over an earlier run without checkpoints
  c.pretrained = ml_collections.ConfigDict(dict(beit="", bert=""))  # Hugging Face names or folders

  c.synthetic = ml_collections.ConfigDict(dict(create_if_missing=False))

  # --mode compile: compile this recipe for a TPU topology on any host (no TPU needed) and
  # report per-chip HBM use (t2v2t_jax/training/compile_plan.py).
  c.compile = ml_collections.ConfigDict(dict(
      topology="",            # e.g. 'v5e:1x1' (Colab), 'v5e:2x4', 'v6e:2x4', 'v4:2x2x1'
      eval_programs=True,     # also the video/text encoders and the rerank scorer
      find_max_batch=False,   # also search the largest per-device train batch that fits
      json_out=""))           # append the results as one JSON line to this file

  c.eval = ml_collections.ConfigDict()
  c.eval.corpora_enabled = True        # evaluate config.data.eval_corpora
  c.eval.num_frames = 4                # inference frames: explicit, printed with the results
  c.eval.k = 128                       # candidates reranked per query
  c.eval.rerank_batch_size = 128       # pairs per device step
  c.eval.video_batch_size = 32
  c.eval.text_batch_size = 256
  c.eval.alpha = 0.0                   # final = itm + alpha * stage-1 similarity (0: VindLU)
  c.eval.token_cache = "memory"        # 'memory' | 'disk' (memory-mapped under the workdir)
  return c


def finetune_config(*, batch_size: int, epochs: float, max_len: int, train_frames: int = 12,
                    eval_frames: int = 12) -> ml_collections.ConfigDict:
  """Retrieval fine-tuning (SPEC 7): lr 1e-5 -> 1e-6, 0.5 warmup epochs, VTC + VTM, bf16 with
  per-layer remat; the recipe adds its corpora."""
  c = base_config()
  c.data.max_len = max_len
  c.batch_size = batch_size
  c.num_frames = train_frames
  c.model.vision.num_frames = train_frames
  c.eval.num_frames = eval_frames
  c.optimizer.lr, c.optimizer.min_lr = 1e-5, 1e-6
  c.optimizer.epochs, c.optimizer.warmup_epochs = epochs, 0.5
  c.loss_weights.update(dict(vtc=1.0, vtm=1.0, mlm=0.0))
  c.model.remat = "full"
  c.model.dtype = "bfloat16"
  return c


def synthetic_corpora(config, root_ref) -> None:
  """Point the data config at the synthetic dataset (created by `input_pipeline.synthetic`)."""
  config.data.train_corpora = [corpus_config("synthetic_train", root_ref + "/train.json", root_ref)]
  config.data.eval_corpora = [corpus_config("synthetic_test", root_ref + "/test.json", root_ref)]
  config.data.tokenizer = root_ref + "/vocab.txt"
  # Created on first use if the folder holds no dataset yet (synthetic_autocreate.py).
  config.synthetic = ml_collections.ConfigDict(dict(
      create_if_missing=True, num_train=64, num_val=16, num_test=16, size=32, fps=8,
      num_frames=8, seed=0))


# The size fields `:tiny` takes from the tiniest variants; every other model field (dtype,
# remat, scan_layers, attention_impl, fusion.*, temp_*, init_std, dropout rates, ...) is a
# choice of the recipe and stays.
TINY_VISION_SIZES = ("variant", "width", "depth", "num_heads", "mlp_dim", "patch_size")
TINY_TEXT_SIZES = ("variant", "width", "num_layers", "num_heads", "mlp_dim", "fusion_layer")


def apply_tiny(config) -> None:
  """Shrink any recipe to the tiniest sizes on synthetic data: seconds per step on a CPU."""
  tiny = model_config("test/16", "test")
  for field in TINY_VISION_SIZES:
    config.model.vision[field] = tiny.vision[field]
  for field in TINY_TEXT_SIZES:
    config.model.text[field] = tiny.text[field]
  config.model.embed_dim = tiny.embed_dim
  config.model.vision.image_size = 32
  config.model.text.vocab_size = 512
  config.model.vision.num_frames = 2
  config.num_frames = 2
  config.eval.num_frames = 2
  config.batch_size = 4
  config.total_steps = 2
  config.log_every = 1
  config.checkpoint_every = 2
  config.eval.k = 4
  config.eval.rerank_batch_size = 8
  config.eval.video_batch_size = 4
  config.eval.text_batch_size = 8
  config.data_root = SYNTHETIC_DEFAULT_ROOT
  synthetic_corpora(config, config.get_ref("data_root"))
  config.data.max_len = 16
  config.data.num_workers = 0
  config.data.failure_min_samples = 1000
  config.pretrained.beit = ""
  config.pretrained.bert = ""
  config.init_from = ""


def finalize(config, arg: str | None):
  args = parse_arg(arg)
  if "mode" in args:
    config.model.fusion.mode = args["mode"]
  if args.get("tiny"):
    apply_tiny(config)
  return config
