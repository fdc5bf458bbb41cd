"""Analytic FLOP count of the T2V2T / VindLU model (forward = 2 x multiply-adds).

Only matrix products are counted (dense layers, the patch-embedding convolution, attention
scores and attention-weighted values, the MLM decoder), as is usual for MFU. LayerNorm,
softmax, GELU, dropout masks and the optimizer update are left out; XLA's own count
(`compiled.cost_analysis()['flops']`, printed by `train_step.py`) includes them, so its
ratio to this count is a little above 1 (and ~4/3 higher with remat, which recomputes the
forward pass).

A training step is 3x the forward FLOPs (forward + backward = 2x forward for the
backward) of every pass the objective makes (`t2v2t_jax/training/objective.py`):
  video encoder once per sample; text encoder once, plus once more on the masked text
  with MLM; fusion over 3 pairs per sample for VTM ((v,t), (v_neg,t), (v,t_neg)) plus one
  pair per sample for MLM; the MLM head on every text position; projections, ITM head.

Run `python benchmarks/flops.py` for the paper-size table (B/16 + BERT-base, 197 tokens a
frame, text 32 tokens, 4 frames) and the fusion cost per pair for 4 and 12 frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from t2v2t_jax.models.config import FUSION_MODES  # noqa: E402  (the names only)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Plain numbers the count needs (from a model ConfigDict with `from_config`)."""
  vision_width: int = 768
  vision_depth: int = 12
  vision_heads: int = 12
  vision_mlp: int = 3072
  patch: int = 16
  image_size: int = 224
  text_width: int = 768
  text_layers: int = 12
  fusion_layer: int = 9
  text_heads: int = 12
  text_mlp: int = 3072
  vocab: int = 30522
  embed_dim: int = 256
  frames: int = 4
  text_len: int = 32
  mode: str = "t2v2t"
  t2v_placement: str = "once"
  t2v_ffn: bool = True
  keep_frame_cls: bool = True

  @classmethod
  def from_config(cls, model_cfg, *, frames: int, text_len: int) -> "Sizes":
    v, t, f = model_cfg.vision, model_cfg.text, model_cfg.fusion
    return cls(vision_width=v.width, vision_depth=v.depth, vision_heads=v.num_heads,
               vision_mlp=v.mlp_dim, patch=v.patch_size, image_size=v.image_size,
               text_width=t.width, text_layers=t.num_layers, fusion_layer=t.fusion_layer,
               text_heads=t.num_heads, text_mlp=t.mlp_dim, vocab=t.vocab_size,
               embed_dim=model_cfg.embed_dim, frames=frames, text_len=text_len, mode=f.mode,
               t2v_placement=f.t2v_placement, t2v_ffn=bool(f.t2v_ffn),
               keep_frame_cls=bool(f.keep_frame_cls))

  def replace(self, **kw) -> "Sizes":
    return dataclasses.replace(self, **kw)

  @property
  def tokens_per_frame(self) -> int:
    """Tokens of one frame in the vision encoder (patches + CLS)."""
    return (self.image_size // self.patch) ** 2 + 1

  @property
  def fusion_tokens_per_frame(self) -> int:
    return self.tokens_per_frame if self.keep_frame_cls else self.tokens_per_frame - 1


def _dense(tokens, d_in, d_out):
  return 2 * tokens * d_in * d_out


def _attention_scores(q_tokens, k_tokens, width):
  """QK^T plus probabilities x V (heads x head_dim = width)."""
  return 2 * (2 * q_tokens * k_tokens * width)


# ----------------------------------------------------------------------------------------
# Per-component forward FLOPs.
# ----------------------------------------------------------------------------------------

def vision_forward(s: Sizes, frames: int | None = None) -> dict:
  """Forward FLOPs of the video encoder for ONE video of `frames` frames, by component."""
  t = s.frames if frames is None else frames
  n, d, m, depth = s.tokens_per_frame, s.vision_width, s.vision_mlp, s.vision_depth
  patches = n - 1
  out = {
      "patch_embed": t * _dense(patches, s.patch * s.patch * 3, d),
      "spatial_qkvo": t * depth * _dense(n, d, 4 * d),
      "spatial_attention": t * depth * _attention_scores(n, n, d),
      "ffn": t * depth * 2 * _dense(n, d, m),
  }
  if t > 1:  # temporal block: every token position attends over the T frames
    out["temporal_qkvo"] = depth * _dense(t * n, d, 4 * d)
    out["temporal_attention"] = depth * n * _attention_scores(t, t, d)
  out["vision_proj"] = t * _dense(1, d, s.embed_dim)
  return out


def _text_layer(s: Sizes, tokens: int) -> dict:
  d = s.text_width
  return {"self_qkvo": _dense(tokens, d, 4 * d),
          "self_attention": _attention_scores(tokens, tokens, d),
          "ffn": 2 * _dense(tokens, d, s.text_mlp)}


def text_forward(s: Sizes) -> dict:
  """Forward FLOPs of the text encoder (layers 0..fusion_layer-1) for ONE text."""
  out = {}
  for k, v in _text_layer(s, s.text_len).items():
    out[k] = s.fusion_layer * v
  out["text_proj"] = _dense(1, s.text_width, s.embed_dim)
  return out


def t2v_block(s: Sizes, frames: int | None = None, bypass: bool = True) -> dict:
  """One T2V block for ONE pair: each frame's N queries over L text keys (+ its own N)."""
  t = s.frames if frames is None else frames
  n, d, lt = s.fusion_tokens_per_frame, s.text_width, s.text_len
  video = t * n
  keys = lt + n if bypass else lt
  out = {
      "t2v_q_out": _dense(video, d, 2 * d),              # query projection and output dense
      "t2v_text_kv": _dense(lt, d, 2 * d),                # text keys/values, shared by frames
      "t2v_attention": t * _attention_scores(n, keys, d),
  }
  if bypass:
    out["t2v_self_kv"] = _dense(video, d, 2 * d)          # each frame's own keys/values
  if s.t2v_ffn:
    out["t2v_ffn"] = 2 * _dense(video, d, s.text_mlp)
  return out


def fusion_forward(s: Sizes, mode: str | None = None, frames: int | None = None) -> dict:
  """Forward FLOPs of the fusion encoder for ONE (text, video) pair, by component."""
  mode = s.mode if mode is None else mode
  if mode not in FUSION_MODES:
    raise ValueError(f"unknown fusion mode {mode!r}")
  t = s.frames if frames is None else frames
  layers = s.text_layers - s.fusion_layer
  lt, d, dv = s.text_len, s.text_width, s.vision_width
  video = t * s.fusion_tokens_per_frame
  out: dict[str, int] = {}

  def add(parts, times=1):
    for k, v in parts.items():
      out[k] = out.get(k, 0) + times * v

  if mode == "joint":
    seq = lt + video
    parts = _text_layer(s, seq)
    add({"joint_qkvo": parts["self_qkvo"], "joint_attention": parts["self_attention"],
         "joint_ffn": parts["ffn"]}, layers)
  else:
    add(_text_layer(s, lt), layers)
    add({"cross_q_out": _dense(lt, d, 2 * d),
         "cross_video_kv": _dense(video, dv, 2 * d),
         "cross_attention": _attention_scores(lt, video, d)}, layers)
    if mode in ("t2v2t", "t2v2t_naive"):
      blocks = 1 if s.t2v_placement == "once" else layers
      add(t2v_block(s, t, bypass=mode == "t2v2t"), blocks)
  out["itm_head"] = _dense(1, d, 2)
  return out


def mlm_head_forward(s: Sizes) -> dict:
  """MLM head on every text position (dense + tied decoder over the vocabulary)."""
  return {"mlm_dense": _dense(s.text_len, s.text_width, s.text_width),
          "mlm_decoder": _dense(s.text_len, s.text_width, s.vocab)}


def total(parts: dict) -> int:
  return int(sum(parts.values()))


def train_step_per_sample(s: Sizes, *, vtc: bool = True, vtm: bool = True, mlm: bool = True
                          ) -> dict:
  """Model FLOPs of one training step per sample (3 x forward of every pass).

  Keys: forward FLOPs of each pass per sample, `forward` their sum, and `train` = 3 x
  forward (the MFU numerator per sample).
  """
  passes = {
      "video": total(vision_forward(s)),
      "text": total(text_forward(s)),
  }
  if vtm:
    passes["fusion_vtm_3pairs"] = 3 * total(fusion_forward(s))
  if mlm:
    passes["text_masked"] = total(text_forward(s))
    passes["fusion_mlm"] = total(fusion_forward(s))
    passes["mlm_head"] = total(mlm_head_forward(s))
  fwd = sum(passes.values())
  passes["forward"] = fwd
  passes["train"] = 3 * fwd
  return passes


def rerank_per_pair(s: Sizes, mode: str | None = None, frames: int | None = None) -> int:
  """Forward FLOPs to score one (text, video) candidate pair in stage-2 reranking."""
  return total(fusion_forward(s, mode, frames))


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------

def _g(x):
  return f"{x / 1e9:,.2f}"


def fusion_table(s: Sizes, frames_list=(4, 12)) -> list[dict]:
  rows = []
  for t in frames_list:
    base = rerank_per_pair(s, "v2t", t)
    joint = rerank_per_pair(s, "joint", t)
    for mode in FUSION_MODES:
      parts = fusion_forward(s, mode, t)
      f = total(parts)
      quad = parts.get("joint_attention", 0) + parts.get("cross_attention", 0) + parts.get(
          "t2v_attention", 0)
      rows.append(dict(frames=t, mode=mode, gflops=f / 1e9, attention_gflops=quad / 1e9,
                       vs_v2t=f / base, vs_joint=f / joint))
  return rows


def paper_report(s: Sizes | None = None) -> str:
  s = s or Sizes()
  lines = []
  n = s.tokens_per_frame
  lines.append(f"Paper size: vision {s.vision_width}x{s.vision_depth} (MLP {s.vision_mlp}), "
               f"{n} tokens/frame, text {s.text_width}x{s.text_layers} (fusion from layer "
               f"{s.fusion_layer}), text length {s.text_len}, vocab {s.vocab}, {s.frames} frames.")
  lines.append("")
  lines.append("Forward GFLOPs per component (one video / one text / one pair):")
  lines.append("| component | GFLOPs |")
  lines.append("|---|---:|")
  v = vision_forward(s)
  for k, x in v.items():
    lines.append(f"| video encoder: {k} | {_g(x)} |")
  lines.append(f"| **video encoder, {s.frames} frames** | **{_g(total(v))}** |")
  tx = text_forward(s)
  lines.append(f"| **text encoder ({s.fusion_layer} layers, {s.text_len} tokens)** | "
               f"**{_g(total(tx))}** |")
  mh = mlm_head_forward(s)
  lines.append(f"| MLM head (decoder over {s.vocab} words on {s.text_len} positions) | "
               f"{_g(total(mh))} |")
  for mode in FUSION_MODES:
    f = fusion_forward(s, mode)
    detail = ", ".join(f"{k} {_g(x)}" for k, x in f.items() if x >= 1e7)
    lines.append(f"| fusion per pair, {mode} | {_g(total(f))} ({detail}) |")
  lines.append("")
  lines.append("Training step per sample (3 x forward; VTC + VTM (3 fusion pairs) + MLM):")
  lines.append("| mode | video | text x2 | fusion x4 | MLM head | forward | train (3x) |")
  lines.append("|---|---:|---:|---:|---:|---:|---:|")
  for mode in FUSION_MODES:
    p = train_step_per_sample(s.replace(mode=mode))
    lines.append(f"| {mode} | {_g(p['video'])} | {_g(p['text'] + p['text_masked'])} | "
                 f"{_g(p['fusion_vtm_3pairs'] + p['fusion_mlm'])} | {_g(p['mlm_head'])} | "
                 f"{_g(p['forward'])} | {_g(p['train'])} |")
  p12 = train_step_per_sample(s.replace(frames=12), mlm=False)
  lines.append(f"| t2v2t, 12 frames, fine-tune (no MLM) | {_g(p12['video'])} | {_g(p12['text'])} | "
               f"{_g(p12['fusion_vtm_3pairs'])} | - | {_g(p12['forward'])} | {_g(p12['train'])} |")
  lines.append("")
  lines.append("Fusion cost per pair (forward GFLOPs; 'attention' = the score/value products "
               "only, i.e. the part quadratic in sequence length):")
  lines.append("| frames | mode | GFLOPs/pair | of which attention | vs v2t | vs joint |")
  lines.append("|---:|---|---:|---:|---:|---:|")
  for r in fusion_table(s):
    lines.append(f"| {r['frames']} | {r['mode']} | {r['gflops']:,.2f} | "
                 f"{r['attention_gflops']:,.2f} | {r['vs_v2t']:.2f}x | {r['vs_joint']:.2f}x |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--frames", type=int, default=4)
  parser.add_argument("--text-len", type=int, default=32)
  parser.add_argument("--json", action="store_true", help="print the tables as JSON")
  args = parser.parse_args()
  s = Sizes(frames=args.frames, text_len=args.text_len)
  if args.json:
    print(json.dumps({
        "train_per_sample": {m: train_step_per_sample(s.replace(mode=m)) for m in FUSION_MODES},
        "fusion_per_pair": fusion_table(s),
        "video_forward": vision_forward(s), "text_forward": text_forward(s)}, indent=1))
  else:
    print(paper_report(s))


if __name__ == "__main__":
  main()
