"""Our train step and VindLU's own PyTorch train step, side by side on this machine.

The comparison point of `shared/reference/TARGETS.md` (CPU, fp32, VTC + VTM with hard
negatives + MLM, AdamW, dropout on): vision width 192 x 4 layers, 3 heads, MLP 768, patch
16; text width 192, 6 layers, fusion from layer 4, 3 heads, MLP 768; batch 4 clips x 4
frames x 224 px, 32 text tokens (`--preset small`). Both models run THE SAME WEIGHTS: the
VindLU model is built from VindLU's code with a fixed seed, its state dict is converted by
this project's importer (`t2v2t_jax/checkpoints/vindlu.py`) and our step starts from
that. Both consume the same batch (uint8 frames, token ids, masks, video indices).

Each side runs in its own process (so each one's CPU seconds are its own, and neither
framework's thread pools get in the other's way), and the main process interleaves them:
round r runs `--steps-per-round` steps of one then of the other, the order swapped every
round (A B, B A, A B, ...), so that a machine whose speed drifts (other jobs, thermal)
is shared fairly. Printed per side: median and mean wall seconds per step, host CPU
seconds per step (user + system of that process), `busy` = CPU / (wall x cores); then
the ratio VindLU / ours of the median step times (above 1: ours is faster), and of the
CPU seconds. `--compare-portable` adds a third side: our step traced with the portable
forms of the model's ops (`t2v2t_jax/models/cpu_ops.py`), i.e. the step before the CPU
forms, so that before and after come from one run. `--infer` adds the inference path:
frames per second of video embedding (ours: what the evaluator's jitted video embedding
computes for evaluation and `--mode search`; VindLU's `encode_vision` + `vision_proj`
under `torch.no_grad`), interleaved the same way. VindLU's PyTorch threads: see
`choose_torch_threads` (on a loaded machine one thread can be much faster than two).

Getting VindLU's code (it is not part of this project and never imported by it):
  git clone https://github.com/klauscc/VindLU /tmp/vindlu   # any folder; pass it below
  python benchmarks/vs_vindlu.py --vindlu /tmp/vindlu [--rounds 6] [--infer] [--compare-portable]
Without `--vindlu` (or with a folder that is not a VindLU checkout) the benchmark says so
and times our step alone. It needs torch and transformers (the `test` extra), nothing of
VindLU's own requirements list: the shims below stand in for what today's packages lack,
and each one in use is printed with the results.

Shims (installed in the VindLU process only, before VindLU's modules are imported):
  - `timm.models.layers.drop.DropPath` when timm is not installed: stochastic depth per
    sample, as timm's (VindLU's temporal blocks import it from timm).
  - transformers >= 5 moved or dropped `apply_chunking_to_forward`, `prune_linear_layer`,
    `find_pruneable_heads_and_indices` (VindLU imports them from `modeling_utils`): the
    first two are taken from `transformers.pytorch_utils`; the third (head pruning, never
    called) raises if called.
  - transformers >= 5 dropped `PreTrainedModel.get_head_mask` and `invert_attention_mask`:
    head masks are never used (None for every layer, as transformers 4 returned); the
    inverted mask is `(1 - mask) * finfo.min` broadcast to [B, 1, 1, S], as in 4.x.
  - transformers >= 5's `init_weights` needs `post_init` first, which VindLU's BERT never
    calls: VindLU's own `_init_weights` is applied to every module and the MLM decoder is
    tied to the word embeddings, as transformers 4 did.
  - No download: VindLU's builders load BEiT/BERT weights from the Hugging Face hub; here
    its `BeitModel` and `BertForMaskedLM` are built from its own config files (in the
    checkout) resized to the benchmark sizes, and initialised with a fixed seed.
  - `torch.distributed`: VindLU's contrastive loss all-gathers over the process group; a
    one-process gloo group stands in for a one-GPU `torchrun`.
  - `tokenizer`: VindLU's MLM masking reads only the [PAD], [CLS] and [MASK] ids (0, 101,
    103 of BERT's uncased vocabulary).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

SPECIAL_IDS = {"cls": 101, "pad": 0, "mask": 103}


def _project_path(root: str | None = None):
  # The repository root first: `benchmarks/input_pipeline.py` must not shadow the
  # `input_pipeline` package. `root`: another checkout of the project (--baseline-tree).
  root = os.path.abspath(root) if root else _ROOT
  here = os.path.join(root, "benchmarks")
  sys.path[:] = [root, here] + [p for p in sys.path
                                if os.path.abspath(p or ".") not in (_ROOT, _HERE, root, here)]


def tree_label(root: str) -> str:
  """'ours @ <commit>' for a git checkout of the project, else 'ours @ <path>'."""
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=30, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  return f"ours @ {commit or os.path.abspath(root)}"


def cpu_seconds() -> float:
  u = resource.getrusage(resource.RUSAGE_SELF)
  return u.ru_utime + u.ru_stime


def timed(fn, n: int) -> list[tuple[float, float]]:
  """(wall s, process CPU s) of each of n calls of `fn` (which must block until done)."""
  out = []
  for _ in range(n):
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    out.append((time.perf_counter() - t0, cpu_seconds() - c0))
  return out


def serve_commands(conn, handlers: dict) -> None:
  """A worker's command loop (see `Side`): answers each `(name, *args)` with
  `handlers[name](*args)` until `("quit",)`."""
  while True:
    name, *args = conn.recv()
    if name == "quit":
      return
    if name not in handlers:
      conn.send({"error": f"this worker has no command {name!r}"})
      continue
    conn.send(handlers[name](*args))


def machine_description() -> str:
  """CPU model, whether it has AVX-512 (the fp32 peak differs ~2x), and the core count."""
  model, flags = platform.processor() or platform.machine(), ""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
    names = [line.split(":", 1)[1].strip() for line in text.splitlines()
             if line.startswith("model name")]
    model = names[0] if names else model
    flags = " (AVX-512)" if "avx512f" in text else " (no AVX-512)"
  except OSError:
    pass
  return f"{model}{flags}, {os.cpu_count()} cores"


def load_average() -> str:
  try:
    return "%.2f %.2f %.2f" % os.getloadavg()
  except OSError:
    return "n/a"


def make_batch(sizes: dict, seed: int = 0) -> dict:
  """Host batch shared by both sides: uint8 frames, ids with [CLS] and padding, masks,
  and pairs 2i, 2i+1 sharing a video index (multi-positive VTC targets, as real data)."""
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  b, t, s, length = sizes["batch"], sizes["frames"], sizes["image_size"], sizes["text_len"]
  frames = rng.integers(0, 256, (b, t, s, s, 3), dtype=np.uint8)
  lengths = rng.integers(max(2, length // 2), length + 1, b)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
  # Ordinary words: BERT's ids from 999 up (below are [unusedN] and the special tokens); a
  # small test vocabulary keeps only its first few ids for the specials.
  first_word = 999 if sizes["vocab"] > 2 * 999 else max(SPECIAL_IDS.values()) + 1
  ids = rng.integers(first_word, sizes["vocab"], (b, length), dtype=np.int64)
  ids[:, 0] = SPECIAL_IDS["cls"]
  ids = np.where(mask.astype(bool), ids, SPECIAL_IDS["pad"])
  return {"frames": frames, "input_ids": ids, "attention_mask": mask,
          "video_idx": np.arange(b, dtype=np.int64) // 2}


# ----------------------------------------------------------------------------------------
# VindLU's side (its own code, from a checkout; nothing of it enters the project).
# ----------------------------------------------------------------------------------------

def is_vindlu_checkout(path: str | None) -> bool:
  return bool(path) and all(os.path.isfile(os.path.join(path, p)) for p in (
      "models/vindlu.py", "models/backbones/beit/st_beit.py", "models/backbones/bert/xbert.py",
      "configs/config_bert.json", "configs/beit-base-patch16-224-pt22k-ft22k.json"))


def install_vindlu_shims() -> list[str]:
  """Stand-ins for what VindLU (2022, transformers 4.x) needs of today's packages; returns
  the list of shims installed (see the module docstring)."""
  import types  # noqa: PLC0415

  import torch  # noqa: PLC0415
  import transformers.modeling_utils as modeling_utils  # noqa: PLC0415
  import transformers.pytorch_utils as pytorch_utils  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415

  used = []
  try:
    import timm.models.layers.drop  # noqa: F401, PLC0415
  except ImportError:
    class DropPath(nn.Module):
      """Per-sample stochastic depth (timm's DropPath semantics)."""

      def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob or 0.0)

      def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
          return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    for name in ("timm", "timm.models", "timm.models.layers", "timm.models.layers.drop"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["timm.models.layers.drop"].DropPath = DropPath
    used.append("timm DropPath (timm not installed)")

  def no_head_pruning(*_args, **_kwargs):
    raise NotImplementedError("head pruning: not used by this benchmark")

  for name in ("apply_chunking_to_forward", "prune_linear_layer"):
    if not hasattr(modeling_utils, name):
      setattr(modeling_utils, name, getattr(pytorch_utils, name))
      used.append(f"transformers.modeling_utils.{name} (from pytorch_utils)")
  for module in (modeling_utils, pytorch_utils):
    if not hasattr(module, "find_pruneable_heads_and_indices"):
      module.find_pruneable_heads_and_indices = no_head_pruning
      used.append(f"{module.__name__}.find_pruneable_heads_and_indices (raises if called)")

  base = modeling_utils.PreTrainedModel
  if not hasattr(base, "get_head_mask"):
    def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
      if head_mask is not None:
        raise NotImplementedError("head masks: not used by this benchmark")
      return [None] * num_hidden_layers
    base.get_head_mask = get_head_mask
    used.append("PreTrainedModel.get_head_mask (no head mask)")
  if not hasattr(base, "invert_attention_mask"):
    def invert_attention_mask(self, mask):
      extended = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
      extended = extended.to(self.dtype)
      return (1.0 - extended) * torch.finfo(self.dtype).min
    base.invert_attention_mask = invert_attention_mask
    used.append("PreTrainedModel.invert_attention_mask (transformers 4 formula)")
  return used


def build_vindlu(vindlu_dir: str, sizes: dict, seed: int):
  """VindLU's pretraining model (VTC + VTM hard negatives + MLM) at `sizes`, its AdamW,
  and the shims used. Imports VindLU's modules from `vindlu_dir`."""
  import torch  # noqa: PLC0415
  import torch.distributed as dist  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415

  sys.path.insert(0, os.path.abspath(vindlu_dir))
  shims = install_vindlu_shims()
  from models.backbones.beit.st_beit import BeitConfig, BeitModel  # noqa: PLC0415
  from models.backbones.bert import xbert  # noqa: PLC0415
  from models.vindlu import VindLU  # noqa: PLC0415
  from utils.easydict import EasyDict  # noqa: PLC0415
  from utils.optimizer import create_optimizer  # noqa: PLC0415

  import transformers  # noqa: PLC0415
  if int(transformers.__version__.split(".")[0]) >= 5:
    def init_weights_v4(self):
      # transformers 4: `_init_weights` on every module, then the MLM decoder tied.
      self.apply(self._init_weights)
      out = self.get_output_embeddings()
      if out is not None:
        out.weight = self.bert.embeddings.word_embeddings.weight
    xbert.BertPreTrainedModel.init_weights = init_weights_v4
    shims.append("BertPreTrainedModel.init_weights (transformers 4 behaviour)")

  with open(os.path.join(vindlu_dir, "configs", "config_bert.json")) as f:
    bert_cfg = json.load(f)
  bert_cfg.update(hidden_size=sizes["text_width"], num_hidden_layers=sizes["text_layers"],
                  num_attention_heads=sizes["text_heads"], intermediate_size=sizes["text_mlp"],
                  fusion_layer=sizes["fusion_layer"], encoder_width=sizes["vision_width"],
                  vocab_size=sizes["vocab"])
  with open(os.path.join(vindlu_dir, "configs", "beit-base-patch16-224-pt22k-ft22k.json")) as f:
    beit_cfg = json.load(f)
  for key in ("note", "url", "architectures", "transformers_version", "torch_dtype"):
    beit_cfg.pop(key, None)
  # VindLU's configs/pretrain.py temporal_modeling, at the benchmark's sizes.
  beit_cfg.update(hidden_size=sizes["vision_width"], num_hidden_layers=sizes["vision_depth"],
                  num_attention_heads=sizes["vision_heads"], intermediate_size=sizes["vision_mlp"],
                  patch_size=sizes["patch"], image_size=sizes["image_size"],
                  num_frames=sizes["frames"], temporal_model_block="timesformer",
                  temporal_model_position="last",
                  temporal_model_config=dict(input_dim=sizes["vision_width"]),
                  use_temporal_position_embedding=True)
  config = EasyDict(dict(
      model=dict(vision_encoder=dict(name="beit", d_model=sizes["vision_width"]),
                 text_encoder=dict(name="bert", d_model=sizes["text_width"]),
                 vit_add_ln=True, embed_dim=sizes["embed_dim"], temp=0.07),
      criterion=dict(loss_weight=dict(vtc=1.0, mlm=1.0, vtm=1.0, mvm=0.0), vtm_hard_neg=True,
                     mlm_masking_prob=0.5),
      optimizer=dict(opt="adamW", lr=1e-4, opt_betas=[0.9, 0.999], weight_decay=0.02,
                     max_grad_norm=-1, different_lr=dict(enable=False, module_names=[], lr=1e-3)),
      inputs=dict(image_res=sizes["image_size"]), gradient_checkpointing=False))

  class VindLUWithoutDownloads(VindLU):
    """VindLU with its encoders built from config files instead of hub weights."""

    def build_vision_encoder(self):
      encoder = BeitModel(BeitConfig(**beit_cfg), add_pooling_layer=True)
      return encoder, nn.LayerNorm(sizes["vision_width"], eps=1e-12)

    def build_text_encoder(self):
      return xbert.BertForMaskedLM(xbert.BertConfig(**bert_cfg))

  class Tokenizer:
    pad_token_id, cls_token_id, mask_token_id = (SPECIAL_IDS["pad"], SPECIAL_IDS["cls"],
                                                 SPECIAL_IDS["mask"])

  if not dist.is_initialized():
    init_file = tempfile.NamedTemporaryFile(prefix="vs_vindlu_gloo_", delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    shims.append("torch.distributed: one-process gloo group")
  torch.manual_seed(seed)
  model = VindLUWithoutDownloads(config, tokenizer=Tokenizer(), is_pretrain=True)
  optimizer = create_optimizer(config.optimizer, model)
  return model, optimizer, shims


def vindlu_frames(clips):
  """uint8 [B, T, H, W, 3] -> VindLU's input, normalised float [B, T, 3, H, W].

  A data loader hands VindLU normalised frames, so this is done outside the timed step,
  with the same (x / 255 - 0.5) / 0.5 as ours (ours normalises inside its step).
  """
  import torch  # noqa: PLC0415
  frames = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float()
  return (frames / 255.0 - 0.5) / 0.5


def vindlu_worker(conn, vindlu_dir: str, sizes: dict, seed: int, weights_path: str,
                  threads: int):
  """VindLU's process: build, save its weights for our side, then time on command."""
  try:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    torch.set_num_threads(threads)
    model, optimizer, shims = build_vindlu(vindlu_dir, sizes, seed)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(weights_path, **state)
    n_params = sum(p.numel() for p in model.parameters())
    conn.send({"ready": True, "shims": shims, "params": int(n_params),
               "torch": torch.__version__, "threads": torch.get_num_threads()})
    held = {}

    def set_batch(host):
      held["batch"] = {"image": vindlu_frames(host["frames"]),
                       "text": type("Text", (), {
                           "input_ids": torch.from_numpy(host["input_ids"]),
                           "attention_mask": torch.from_numpy(host["attention_mask"])})(),
                       "idx": torch.from_numpy(host["video_idx"])}
      return {"ok": True}

    def train(n):
      model.train()
      batch = held["batch"]

      def step():
        losses = model(batch["image"], batch["text"], idx=batch["idx"])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step.loss = loss.item()
      return {"times": timed(step, n), "loss": getattr(step, "loss", None)}

    def set_threads(n):
      torch.set_num_threads(n)
      return {"threads": torch.get_num_threads()}

    def set_infer_frames(clips):
      held["image"] = vindlu_frames(clips)
      return {"ok": True}

    def infer(n):
      model.eval()

      def encode():
        with torch.no_grad():
          _, pooled = model.encode_vision(held["image"])
          F.normalize(model.vision_proj(pooled), dim=-1)
      return {"times": timed(encode, n)}

    serve_commands(conn, {"batch": set_batch, "train": train, "threads": set_threads,
                          "infer_frames": set_infer_frames, "infer": infer})
  except Exception:  # noqa: BLE001 (reported to the main process)
    conn.send({"error": traceback.format_exc()})


# ----------------------------------------------------------------------------------------
# Our side.
# ----------------------------------------------------------------------------------------

def load_into(model, values: dict) -> None:
  """Writes `{dotted parameter path: array}` into the model's parameters (every one)."""
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  by_name = {".".join(str(k) for k in path): path for path in flat}
  if set(by_name) != set(values):
    raise ValueError(f"converted weights do not match the model: missing "
                     f"{sorted(set(by_name) - set(values))[:5]}, unexpected "
                     f"{sorted(set(values) - set(by_name))[:5]}")
  nnx.update(model, nnx.from_flat_state({
      path: flat[path].replace(value=jnp.asarray(values[name], flat[path].get_value().dtype))
      for name, path in by_name.items()}))


def ours_worker(conn, argv: list[str], weights_path: str | None, portable: bool = False,
                root: str | None = None):
  """Our process: the project's train step (`make_train_step`, the objective and AdamW of
  training), jitted on the one CPU device with the old state donated, as training runs it.
  `portable`: traced with the portable forms of the model's ops instead of the CPU forms
  (`t2v2t_jax.models.cpu_ops`), i.e. the step as it was before the CPU forms. `root`:
  the project's code from another checkout (an earlier commit), for before/after."""
  import contextlib  # noqa: PLC0415
  try:
    _project_path(root)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    import train_step as bench  # noqa: PLC0415
    from t2v2t_jax.models.t2v2t import create_model  # noqa: PLC0415
    from t2v2t_jax.training import optimizer as optimizer_lib  # noqa: PLC0415
    from t2v2t_jax.training.train_state import PRNG_IMPL  # noqa: PLC0415
    from t2v2t_jax.training.train_step import make_train_step  # noqa: PLC0415

    args = parse_args(argv)
    cfg = bench.build_model_config(args)
    model = create_model(cfg, seed=0)
    weights_note = "the model's own initialisation (no VindLU weights)"
    if weights_path:
      from t2v2t_jax.checkpoints import vindlu  # noqa: PLC0415
      with np.load(weights_path) as f:
        state_dict = {k: f[k] for k in f.files}
      values, report = vindlu.import_vindlu(state_dict, cfg, model=model,
                                            source="VindLU state dict")
      load_into(model, values)
      weights_note = (f"VindLU's, converted by t2v2t_jax.checkpoints.vindlu: "
                      f"{len(report.loaded)} tensors loaded, {len(report.new)} new, "
                      f"{len(report.dropped)} dropped")
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optimizer_lib.make_optimizer(bench.cfg_optimizer(), total_steps=1000)
    schedule = optimizer_lib.make_schedule(bench.cfg_optimizer(), 1000)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params),
             "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(17, impl=PRNG_IMPL))}
    special = {**SPECIAL_IDS, "vocab_size": cfg.text.vocab_size}
    step_fn = jax.jit(make_train_step(
        graphdef, tx, loss_weights={"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}, special_ids=special,
        temp_bounds=(cfg.temp_min, cfg.temp_max), lr_schedule=schedule), donate_argnums=(0,))

    def encode_video(params, frames):
      # What the evaluator's jitted video embedding computes (`RetrievalEvaluator`, used
      # by evaluation and `--mode search`): per-frame embeddings and float16 tokens.
      m = nnx.merge(graphdef, params)
      pooled, tokens = m.encode_video(frames)
      return m.video_embedding(pooled), tokens.astype(jnp.float16)
    encode_video = jax.jit(encode_video)

    holder = {"state": state}
    conn.send({"ready": True, "weights": weights_note, "jax": jax.__version__,
               "config": bench.describe_config(cfg, args),
               "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))})
    if portable:
      from t2v2t_jax.models import cpu_ops  # noqa: PLC0415
      forms = cpu_ops.portable_forms()
    else:
      forms = contextlib.nullcontext()
    with forms:  # the step and the encoder are traced at their first call, below
      _serve_ours(conn, holder, step_fn, encode_video)
  except Exception:  # noqa: BLE001 (reported to the main process)
    conn.send({"error": traceback.format_exc()})


def _serve_ours(conn, holder, step_fn, encode_video):
  """Our worker's commands (see `Side`): batch, train N, infer_frames, infer N."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  held = {}

  def set_batch(host):
    held["batch"] = jax.device_put({
        "frames": host["frames"], "input_ids": host["input_ids"].astype(np.int32),
        "attention_mask": host["attention_mask"].astype(np.int32),
        "video_idx": host["video_idx"].astype(np.int32)})
    t0 = time.perf_counter()
    holder["state"], metrics = step_fn(holder["state"], held["batch"])   # compiles
    jax.block_until_ready(metrics["loss"])
    return {"ok": True, "compile_and_first_step_s": time.perf_counter() - t0}

  def train(n):
    def step():
      holder["state"], metrics = step_fn(holder["state"], held["batch"])
      step.loss = float(jax.block_until_ready(metrics["loss"]))
    return {"times": timed(step, n), "loss": getattr(step, "loss", None)}

  def set_infer_frames(clips):
    held["frames"] = jax.device_put(clips)
    return {"ok": True}

  def infer(n):
    params = holder["state"]["params"]

    def encode():
      jax.block_until_ready(encode_video(params, held["frames"]))
    return {"times": timed(encode, n)}

  serve_commands(conn, {"batch": set_batch, "train": train,
                        "infer_frames": set_infer_frames, "infer": infer})


# ----------------------------------------------------------------------------------------
# Main: start both sides, interleave, report.
# ----------------------------------------------------------------------------------------

def parse_args(argv=None):
  if "train_step" not in sys.modules:   # a --baseline-tree worker has imported its own
    _project_path()
  import train_step as bench  # noqa: PLC0415
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  bench.add_model_args(parser, default_preset="small")
  parser.set_defaults(mode="v2t")  # VindLU's model
  parser.add_argument("--vindlu", default=os.environ.get("VINDLU_DIR"),
                      help="path of a VindLU checkout (default: $VINDLU_DIR)")
  parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
  parser.add_argument("--steps-per-round", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
  parser.add_argument("--infer", action="store_true",
                      help="also time video embedding (frames/s), interleaved the same way")
  parser.add_argument("--infer-clips", type=int, default=16,
                      help="clips per inference call (each of --frames frames)")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="VindLU's torch threads; 0 (default): time 1 and all cores, "
                           "interleaved, before the comparison and keep the faster")
  parser.add_argument("--seed", type=int, default=0, help="VindLU's weights (torch seed)")
  parser.add_argument("--compare-portable", action="store_true",
                      help="also run our step traced with the portable forms of the ops "
                           "(t2v2t_jax.models.cpu_ops.portable_forms: the step before the "
                           "CPU forms), as a third side of the interleaving")
  parser.add_argument("--baseline-tree", metavar="PATH",
                      help="also run our step from another checkout of the project (e.g. "
                           "`git worktree add /tmp/base <commit>`), as a third side: before "
                           "and after a change in one run")
  parser.add_argument("--json-out", help="append the JSON result line to this file")
  args = parser.parse_args(argv)
  if args.baseline_tree and not os.path.isdir(os.path.join(args.baseline_tree, "t2v2t_jax")):
    parser.error(f"--baseline-tree {args.baseline_tree!r} is not a checkout of this project "
                 f"(no t2v2t_jax/ in it)")
  bench.resolve_args(args)
  return args


def sizes_of(cfg, args) -> dict:
  v, t = cfg.vision, cfg.text
  return dict(vision_width=v.width, vision_depth=v.depth, vision_heads=v.num_heads,
              vision_mlp=v.mlp_dim, patch=v.patch_size, image_size=v.image_size,
              frames=args.frames, text_width=t.width, text_layers=t.num_layers,
              text_heads=t.num_heads, text_mlp=t.mlp_dim, fusion_layer=t.fusion_layer,
              vocab=t.vocab_size, embed_dim=cfg.embed_dim, batch=args.batch,
              text_len=args.text_len)


class Side:
  """One worker process and the command protocol."""

  def __init__(self, name, target, args):
    ctx = multiprocessing.get_context("spawn")
    self.name = name
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=target, args=(child,) + tuple(args), daemon=True)
    self.process.start()

  def ask(self, *cmd):
    if cmd:
      self.conn.send(cmd)
    reply = self.conn.recv()
    if "error" in reply:
      raise RuntimeError(f"{self.name} worker failed:\n{reply['error']}")
    return reply

  def close(self):
    try:
      self.conn.send(("quit",))
    except (BrokenPipeError, OSError):
      pass
    self.process.join(timeout=30)


def choose_torch_threads(vindlu: Side, cores: int, rounds: int = 2, steps: int = 2) -> dict:
  """Times VindLU's step with 1 thread and with all cores (interleaved) and keeps the faster.

  Why: on a machine where other jobs hold cores, PyTorch's OpenMP threads wait at every
  parallel region for a thread that is not running; on this 2-core machine with a
  background job, 2 threads took ~13 s a step where 1 thread took ~0.9 s. XLA's thread
  pool does not collapse like this. The comparison uses VindLU's better setting.
  """
  counts = sorted({1, cores})
  walls = {n: [] for n in counts}
  for r in range(rounds):
    for n in (counts if r % 2 == 0 else counts[::-1]):
      vindlu.ask("threads", n)
      walls[n] += [w for w, _ in vindlu.ask("train", steps)["times"]]
  medians = {n: statistics.median(w) for n, w in walls.items()}
  best = min(medians, key=medians.get)
  vindlu.ask("threads", best)
  print("[vs_vindlu] VindLU threads probe (median s/step): " + ", ".join(
      f"{n} thread{'s' if n > 1 else ''} {m:.3f}" for n, m in medians.items())
      + f"; using {best}", flush=True)
  return {"median_s": {str(n): m for n, m in medians.items()}, "chosen": best}


def summarize(times: list[tuple[float, float]], cores: int) -> dict:
  walls = [w for w, _ in times]
  cpus = [c for _, c in times]
  return {"n": len(times), "wall_median": statistics.median(walls),
          "wall_mean": statistics.fmean(walls), "wall_min": min(walls), "wall_max": max(walls),
          "cpu_per_step": statistics.fmean(cpus),
          "busy": sum(cpus) / (sum(walls) * cores)}


def interleave(sides: list[Side], command: tuple, rounds: int) -> dict[str, list]:
  """Runs `command` on each side per round, the order swapped every round."""
  out = {s.name: [] for s in sides}
  per_round = []
  for r in range(rounds):
    order = sides if r % 2 == 0 else sides[::-1]
    medians = {}
    for side in order:
      times = side.ask(*command)["times"]
      out[side.name] += times
      medians[side.name] = statistics.median(w for w, _ in times)
    per_round.append(medians)
    print(f"[vs_vindlu] round {r + 1}/{rounds} {command[0]}: " + ", ".join(
        f"{k} {v:.3f} s" for k, v in medians.items()) + f"; load {load_average()}", flush=True)
  out["per_round"] = per_round
  return out


def print_table(title: str, results: dict, unit_per_call: float | None, unit: str) -> None:
  print(f"\n{title}")
  print("| side | median s | mean s | min s | CPU s / call | busy |"
        + (f" {unit} |" if unit_per_call else ""))
  print("|---|---|---|---|---|---|" + ("---|" if unit_per_call else ""))
  for name, r in results.items():
    extra = f" {unit_per_call / r['wall_median']:.1f} |" if unit_per_call else ""
    print(f"| {name} | {r['wall_median']:.3f} | {r['wall_mean']:.3f} | {r['wall_min']:.3f} | "
          f"{r['cpu_per_step']:.2f} | {r['busy']:.2f} |{extra}")


def main(argv=None):
  args = parse_args(argv)
  import train_step as bench  # noqa: PLC0415
  cfg = bench.build_model_config(args)
  sizes = sizes_of(cfg, args)
  cores = os.cpu_count() or 1
  result = {"benchmark": "vs_vindlu", "machine": machine_description(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": load_average(),
            "argv": sys.argv[1:], "sizes": sizes}
  print(f"[vs_vindlu] {result['machine']}; load average {result['load_before']}", flush=True)

  have_vindlu = is_vindlu_checkout(args.vindlu)
  if have_vindlu and sizes["vision_width"] // 64 != sizes["vision_heads"]:
    # VindLU's temporal attention has width // 64 heads (models/modules/temporal_model.py)
    # whatever the BEiT heads; ours uses the BEiT heads. Unequal, the models would differ.
    print(f"[vs_vindlu] vision width {sizes['vision_width']} with {sizes['vision_heads']} "
          f"heads: VindLU's temporal attention would have width // 64 = "
          f"{sizes['vision_width'] // 64} heads, not the same model; choose a width of "
          f"64 x heads (the small preset: 192, 3 heads).", flush=True)
    return 2
  if not have_vindlu:
    where = f"{args.vindlu!r} is not a VindLU checkout" if args.vindlu else "no --vindlu given"
    print(f"[vs_vindlu] {where}: timing our step alone. To compare, get VindLU's code with "
          f"`git clone https://github.com/klauscc/VindLU /tmp/vindlu` and pass "
          f"--vindlu /tmp/vindlu.", flush=True)

  tmp = tempfile.mkdtemp(prefix="vs_vindlu_")
  weights_path = os.path.join(tmp, "vindlu_state.npz") if have_vindlu else None
  sides = []
  try:
    if have_vindlu:
      vindlu = Side("VindLU", vindlu_worker,
                    (args.vindlu, sizes, args.seed, weights_path, args.torch_threads or cores))
      sides.append(vindlu)
      info = vindlu.ask()
      result["vindlu"] = {k: info[k] for k in ("shims", "params", "torch", "threads")}
      print(f"[vs_vindlu] VindLU built ({info['params']:,} parameters, torch {info['torch']}, "
            f"{info['threads']} threads); shims used:\n  - " + "\n  - ".join(info["shims"]),
            flush=True)
    our_argv = sys.argv[1:] if argv is None else list(argv)
    ours = Side("ours", ours_worker, (our_argv, weights_path))
    sides.insert(0, ours)
    info = ours.ask()
    result["ours"] = {k: info[k] for k in ("weights", "jax", "config", "params")}
    print(f"[vs_vindlu] ours: {info['config']}; {info['params']:,} parameters; weights "
          f"{info['weights']}", flush=True)
    if args.compare_portable:
      sides.insert(1, Side("ours, portable forms", ours_worker, (our_argv, weights_path, True)))
      sides[1].ask()
    if args.baseline_tree:
      base = Side(tree_label(args.baseline_tree), ours_worker,
                  (our_argv, weights_path, False, args.baseline_tree))
      sides.insert(1, base)
      info = base.ask()
      print(f"[vs_vindlu] {base.name}: {info['config']}", flush=True)

    host_batch = make_batch(sizes)
    for side in sides:
      reply = side.ask("batch", host_batch)
      if "compile_and_first_step_s" in reply:
        result.setdefault("compile_and_first_step_s", {})[side.name] = (
            reply["compile_and_first_step_s"])
        print(f"[vs_vindlu] {side.name}: compile + first step "
              f"{reply['compile_and_first_step_s']:.1f} s", flush=True)
    for side in sides:
      side.ask("train", args.warmup)
    if have_vindlu and not args.torch_threads:
      result["vindlu_threads_probe"] = choose_torch_threads(vindlu, cores)


    runs = interleave(sides, ("train", args.steps_per_round), args.rounds)
    train = {s.name: summarize(runs[s.name], cores) for s in sides}
    result["train"] = train
    result["train_per_round"] = runs["per_round"]
    print_table(f"Train step, {args.rounds} rounds x {args.steps_per_round} steps per side",
                train, args.batch, "samples/s")
    if have_vindlu:
      for side in sides:
        if side.name == "VindLU":
          continue
        ratio = train["VindLU"]["wall_median"] / train[side.name]["wall_median"]
        cpu_ratio = train["VindLU"]["cpu_per_step"] / train[side.name]["cpu_per_step"]
        rounds = [r["VindLU"] / r[side.name] for r in runs["per_round"]]
        result.setdefault("ratios", {})[side.name] = {
            "wall": ratio, "cpu": cpu_ratio, "wall_per_round": rounds}
        print(f"\n[vs_vindlu] VindLU / {side.name}, median step: {ratio:.2f}x (per round "
              f"{min(rounds):.2f}-{max(rounds):.2f}); CPU seconds per step: {cpu_ratio:.2f}x "
              f"({'ours faster' if ratio > 1 else 'VindLU faster'})", flush=True)

    if args.infer:
      clips = make_batch({**sizes, "batch": args.infer_clips}, seed=1)["frames"]
      for side in sides:
        side.ask("infer_frames", clips)
        side.ask("infer", args.warmup)   # ours compiles here
      runs = interleave(sides, ("infer", args.steps_per_round), args.rounds)
      infer = {s.name: summarize(runs[s.name], cores) for s in sides}
      n_frames = args.infer_clips * args.frames
      for r in infer.values():
        r["frames_per_s"] = n_frames / r["wall_median"]
        r["frames_per_cpu_s"] = n_frames / r["cpu_per_step"]
      result["infer"] = infer
      result["infer_per_round"] = runs["per_round"]
      print_table(f"Video embedding, {args.infer_clips} clips x {args.frames} frames per call",
                  infer, n_frames, "frames/s")
      if have_vindlu:
        for side in sides:
          if side.name != "VindLU":
            ratio = infer["VindLU"]["wall_median"] / infer[side.name]["wall_median"]
            cpu_ratio = infer["VindLU"]["cpu_per_step"] / infer[side.name]["cpu_per_step"]
            result.setdefault("infer_ratios", {})[side.name] = {"wall": ratio, "cpu": cpu_ratio}
            print(f"\n[vs_vindlu] video embedding, VindLU / {side.name} time: {ratio:.2f}x "
                  f"(CPU seconds {cpu_ratio:.2f}x)", flush=True)
  finally:
    for side in sides:
      side.close()
  result["load_after"] = load_average()
  print(f"[vs_vindlu] load average after: {result['load_after']}", flush=True)
  line = json.dumps(result, sort_keys=True, default=str)
  print(line, flush=True)
  if args.json_out:
    with open(args.json_out, "a") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
