"""The paper-size parameter count, computed without allocating weights."""

from t2v2t_jax.models import summary
from t2v2t_jax.models.config import model_config


def test_v2t_matches_vindlu_parameter_count_exactly():
  counts = summary.count_by_part(model_config("B/16", "base", "v2t"))
  # VindLU's pretraining model less its 12 unused temporal `linear` layers (SPEC 8, TARGETS).
  assert sum(counts.values()) == 238_221_833 - 12 * 590_592


def test_t2v2t_adds_one_bypass_block():
  v2t = sum(summary.count_by_part(model_config("B/16", "base", "v2t")).values())
  counts = summary.count_by_part(model_config("B/16", "base", "t2v2t"))
  # One T2V block: 2 LayerNorms on the input, q/k/v/output projections, gated FFN, 2 gates.
  d, m = 768, 3072
  block = 2 * 2 * d + 4 * (d * d + d) + 2 * d + (d * m + m) + (m * d + d) + 2
  assert counts["fusion_encoder.t2v (bypass)"] == block
  assert sum(counts.values()) - v2t == block


def test_summary_prints_every_mode():
  text = summary.format_summary("test/16", "test", 2)
  for mode in ("v2t", "t2v2t", "t2v2t_naive", "joint"):
    assert mode in text
