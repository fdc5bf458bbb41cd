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
  # The objective and LR schedule (t2v2t_jax/training/objective.py, docs/reproducing.md).
  # 'vindlu' (the paper recipes'): what VindLU's code optimised on the poster's GPUs: VTC
  # weighted 1/vindlu_world_size, VTM negatives and MLM means per group of vindlu_gpu_batch
  # rows of the global batch, VindLU's LR formula. 'global' (the project's own): the global
  # VTC loss's full gradient, negatives by `vtm_negatives`, optax warmup + cosine.
  c.protocol = "global"                # 'vindlu' | 'global'
  c.vindlu_world_size = 1              # 'vindlu': the poster's GPU count for this recipe
  c.vindlu_gpu_batch = 32              # 'vindlu': the poster's per-GPU batch
  c.vtm_negatives = "global"           # 'global': 'global' | 'per_device' (each device's rows)
  c.deterministic = False              # True: train with every dropout and stochastic depth off
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
  c.eval_every_epochs = 0.0            # > 0: evaluate every that many epochs (overrides eval_every)
  # '<eval corpus>/<metric>' (higher is better, e.g. 'didemo_val/r_mean'): the evaluated step
  # that scores best is kept and named in checkpoints/best.json (VindLU's stop_key); '': none.
  c.best_key = ""
  c.pick_checkpoint = "best"           # --mode eval / init_from read: 'best' (if marked) | 'latest'
  # A jax.profiler trace into workdir/tensorboard (TensorBoard's Profile tab), process 0 only.
  c.profile_steps = ""                 # 'START:STOP' traces steps START+1..STOP ('10:15'); '': none
  c.init_from = ""                     # a run's workdir / checkpoint folder, or a VindLU .pth
  c.start_over = False                 # start from scratch over an earlier run without checkpoints
  c.pretrained = ml_collections.ConfigDict(dict(beit="", bert=""))  # Hugging Face names or folders
  # A fine-tuning recipe sets `requires_init`: started without init_from or pretrained it
  # would train BEiT-B and BERT from random weights for hours, so it refuses to start
  # unless `allow_random_init` says that is meant (`config_checks.check_initialization`).
  c.requires_init = False
  c.allow_random_init = False

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
  # Where the rerank's video tokens come from. 'memory' / 'disk': stage 1 keeps all of them
  # in float16 on every process, in RAM or memory-mapped under the workdir (videos x frames
  # x 197 x 768 x 2 bytes: 3.4 GiB for MSR-VTT at 12 frames, 44 GiB for ActivityNet at 32);
  # 'recompute': only the embeddings are kept and the rerank reads and encodes each video
  # once more (the same program on the same frames: the same tokens; +100% of stage 1's
  # video-encoder FLOPs and reads, one batch of tokens held: docs/benchmarks.md); 'auto':
  # 'memory' when the tokens fit in eval.token_memory_gib, else 'recompute'.
  c.eval.token_cache = "auto"          # 'auto' | 'memory' | 'disk' | 'recompute': rerank tokens
  c.eval.token_memory_gib = 8.0        # 'auto' keeps a corpus's video tokens in RAM up to this
  return c


def finetune_config(*, gpus: int, epochs: float, max_len: int, train_frames: int = 12,
                    eval_frames: int = 12) -> ml_collections.ConfigDict:
  """Retrieval fine-tuning (SPEC 7): batch 32 x `gpus` (the poster's), lr 1e-5 -> 1e-6,
  0.5 warmup epochs, VTC + VTM, bf16 with per-layer remat, VindLU's objective and schedule
  on those GPUs (protocol 'vindlu'); the recipe adds its corpora."""
  c = base_config()
  c.data.max_len = max_len
  c.batch_size = 32 * gpus
  c.protocol = "vindlu"
  c.vindlu_world_size, c.vindlu_gpu_batch = gpus, 32
  c.num_frames = train_frames
  c.model.vision.num_frames = train_frames
  c.eval.num_frames = eval_frames
  c.optimizer.lr, c.optimizer.min_lr = 1e-5, 1e-6
  c.optimizer.epochs, c.optimizer.warmup_epochs = epochs, 0.5
  c.loss_weights.update(dict(vtc=1.0, vtm=1.0, mlm=0.0))
  c.requires_init = True  # fine-tuning from random weights is refused unless asked for
  c.eval_every_epochs = 1.0  # VindLU evaluates after every epoch (the recipe sets best_key)
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
  config.allow_random_init = True  # no pretrained weights exist at these sizes
  if config.best_key:  # the recipe's corpus becomes the synthetic test split
    config.best_key = "synthetic_test/" + config.best_key.partition("/")[2]


def finalize(config, arg: str | None):
  args = parse_arg(arg)
  if "mode" in args:
    config.model.fusion.mode = args["mode"]
  if args.get("tiny"):
    apply_tiny(config)
  return config
