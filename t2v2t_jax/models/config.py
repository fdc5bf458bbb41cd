"""Model configuration: size variants by name, and validation.

Configs stay short by naming sizes (`"B/16"`, `"base"`); `model_config()` expands the
names into explicit fields so that modules read plain numbers, and a checkpoint importer
can overwrite them (e.g. from a Hugging Face `config.json`).
"""

from __future__ import annotations

import ml_collections

from t2v2t_jax.models.layer_stack import REMAT_POLICIES, SCAN_SETTINGS

# width, depth, heads, mlp
VISION_VARIANTS = {
    "B": (768, 12, 12, 3072),
    "S": (384, 12, 6, 1536),
    "Ti": (192, 12, 3, 768),
    "test": (32, 2, 2, 64),  # the tiniest variant, for tests only
}

# width, layers, heads, mlp, fusion_layer (first layer of the fusion encoder)
TEXT_VARIANTS = {
    "base": (768, 12, 12, 3072, 9),
    "small": (384, 12, 6, 1536, 9),
    "tiny": (192, 6, 3, 768, 4),
    "test": (32, 4, 2, 64, 2),
}

FUSION_MODES = ("v2t", "t2v2t", "t2v2t_naive", "joint")
T2V_PLACEMENTS = ("once", "per_layer")
LAYER_ORDERS = ("vindlu", "cross_first")
T2V_RESIDUALS = ("gated", "post_ln")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "explicit")


def parse_vision_variant(variant: str) -> dict:
  """`"B/16"` -> dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16)."""
  try:
    name, patch = variant.split("/")
    width, depth, heads, mlp = VISION_VARIANTS[name]
    patch = int(patch)
  except (ValueError, KeyError) as e:
    raise ValueError(
        f"Unknown vision variant {variant!r}: expected '<size>/<patch>' with size in "
        f"{sorted(VISION_VARIANTS)}, e.g. 'B/16'.") from e
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch)


def parse_text_variant(variant: str) -> dict:
  if variant not in TEXT_VARIANTS:
    raise ValueError(f"Unknown text variant {variant!r}: expected one of {sorted(TEXT_VARIANTS)}.")
  width, layers, heads, mlp, fusion_layer = TEXT_VARIANTS[variant]
  return dict(width=width, num_layers=layers, num_heads=heads, mlp_dim=mlp,
              fusion_layer=fusion_layer)


def model_config(vision: str = "B/16", text: str = "base", fusion_mode: str = "t2v2t"
                 ) -> ml_collections.ConfigDict:
  """The full model config with SPEC defaults; sizes expanded from the variant names."""
  c = ml_collections.ConfigDict()

  c.vision = ml_collections.ConfigDict()
  c.vision.variant = vision
  c.vision.update(parse_vision_variant(vision))
  c.vision.image_size = 224
  c.vision.num_frames = 4          # length of the stored temporal position embedding
  c.vision.drop_path_rate = 0.1    # stochastic depth, linspace(0, rate, depth)
  c.vision.layer_scale_init = 0.1
  c.vision.layer_norm_eps = 1e-12
  c.vision.dropout_rate = 0.0

  c.text = ml_collections.ConfigDict()
  c.text.variant = text
  c.text.update(parse_text_variant(text))
  c.text.vocab_size = 30522
  c.text.max_position = 512
  c.text.type_vocab_size = 2
  c.text.dropout_rate = 0.1        # hidden and attention-probability dropout (BERT)
  c.text.layer_norm_eps = 1e-12

  c.fusion = ml_collections.ConfigDict()
  c.fusion.mode = fusion_mode
  c.fusion.t2v_placement = "once"        # DECISION (SPEC 3)
  c.fusion.layer_order = "vindlu"        # DECISION: self-attn, cross-attn, FFN
  c.fusion.t2v_residual = "gated"        # DECISION: gated residual, gate init 0
  c.fusion.keep_frame_cls = True         # DECISION: 197 tokens per frame, as VindLU
  c.fusion.t2v_ffn = True                # DECISION: the T2V block has a gated FFN

  c.embed_dim = 256
  c.init_std = 0.02                      # std of new dense/embedding weights (BERT, BEiT); only from-scratch training changes it
  c.temp_init = 0.07
  c.temp_min = 0.001
  c.temp_max = 0.5
  c.dtype = "float32"                    # compute dtype; parameters stay float32
  c.remat = "none"                       # per-layer remat policy: 'none' | 'full' | 'save_dots' (layer_stack.py)
  c.scan_layers = "auto"                 # 'auto' (scan on TPU, unroll on GPU/CPU) | 'on' | 'off' (layer_stack.py)
  c.attention_impl = "auto"              # 'auto': jax.nn.dot_product_attention unless attention dropout is active
  return c


def check_choice(field: str, value, allowed) -> None:
  """`model.<field>=<value>` must be one of `allowed`: else one line naming both."""
  if value not in allowed:
    raise ValueError(f"model.{field}={value!r} is not one of {list(allowed)}")


def validate_model_config(c: ml_collections.ConfigDict) -> None:
  """Fail early, naming the field, for choices that would only break at trace time.

  The one place these rules live: `T2V2T` and `FusionEncoder` call it when built.
  """
  check = check_choice
  check("fusion.mode", c.fusion.mode, FUSION_MODES)
  check("fusion.t2v_placement", c.fusion.t2v_placement, T2V_PLACEMENTS)
  check("fusion.layer_order", c.fusion.layer_order, LAYER_ORDERS)
  check("fusion.t2v_residual", c.fusion.t2v_residual, T2V_RESIDUALS)
  check("dtype", c.dtype, DTYPES)
  check("attention_impl", c.attention_impl, ATTENTION_IMPLS)
  check("remat", c.remat, REMAT_POLICIES + (True, False))
  check("scan_layers", c.get("scan_layers", "auto"), SCAN_SETTINGS + (True, False))
  if c.vision.width % c.vision.num_heads:
    raise ValueError(f"model.vision.width={c.vision.width} is not divisible by num_heads={c.vision.num_heads}")
  if c.text.width % c.text.num_heads:
    raise ValueError(f"model.text.width={c.text.width} is not divisible by num_heads={c.text.num_heads}")
  if not 0 < c.text.fusion_layer < c.text.num_layers:
    raise ValueError(f"model.text.fusion_layer={c.text.fusion_layer} must be in [1, num_layers={c.text.num_layers})")
  if c.vision.image_size % c.vision.patch_size:
    raise ValueError(f"model.vision.image_size={c.vision.image_size} is not a multiple of patch_size={c.vision.patch_size}")
  if c.fusion.mode in ("t2v2t", "t2v2t_naive", "joint") and c.vision.width != c.text.width:
    # The T2V block attends over concat(text, frame) and joint fusion concatenates both
    # sequences, so the two encoders must share a width.
    raise ValueError(f"fusion mode {c.fusion.mode!r} needs model.vision.width ({c.vision.width}) == "
                     f"model.text.width ({c.text.width})")
