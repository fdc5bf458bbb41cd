"""Frame indices against values worked out by hand from the SPEC's formulas."""

import numpy as np
import pytest

from input_pipeline.frame_sampling import sample_frame_indices


class _Recorder:
  """Stands in for np.random.Generator: `integers(lo, hi)` returns lo + offset (clamped
  below hi) and records the ranges it was asked for."""

  def __init__(self, offset=0):
    self.offset = offset
    self.calls = []

  def integers(self, lo, hi):
    self.calls.append((int(lo), int(hi)))
    return min(lo + self.offset, hi - 1)


# (vlen, T) -> middle indices. edges = linspace(0, vlen, T+1).astype(int), index
# (start + end - 1) // 2.
MIDDLE_CASES = {
    # edges 0,4,8,12,16 -> (0+3)//2, (4+7)//2, ...
    (16, 4): [1, 5, 9, 13],
    # edges 0,2,5,7,10 (linspace 0,2.5,5,7.5,10) -> (0+1)//2, (2+4)//2, (5+6)//2, (7+9)//2
    (10, 4): [0, 3, 5, 8],
    # edges 0,1,2,3,4 -> 0,1,2,3
    (4, 4): [0, 1, 2, 3],
    # edges 0,12,25,37,50,62,75,87,100 (linspace(0,100,9) = 0,12.5,25,...)
    (100, 8): [5, 18, 30, 43, 55, 68, 80, 93],
    (1, 1): [0],
    (30, 1): [14],
}


@pytest.mark.parametrize("vlen,num_frames", sorted(MIDDLE_CASES))
def test_middle_matches_hand_computed(vlen, num_frames):
  assert sample_frame_indices(vlen, num_frames, "middle") == MIDDLE_CASES[(vlen, num_frames)]


def test_middle_7_4_edges():
  # (7, 4): linspace(0, 7, 5) = [0, 1.75, 3.5, 5.25, 7] -> [0, 1, 3, 5, 7]
  # middles: (0+0)//2=0, (1+2)//2=1, (3+4)//2=3, (5+6)//2=5
  assert sample_frame_indices(7, 4, "middle") == [0, 1, 3, 5]


def test_short_video_repeats_last_frame():
  for mode in ("rand", "middle"):
    assert sample_frame_indices(3, 8, mode, np.random.default_rng(0)) == [0, 1, 2, 2, 2, 2, 2, 2]
    assert sample_frame_indices(1, 4, mode, np.random.default_rng(0)) == [0, 0, 0, 0]


def test_rand_ranges_and_values_with_a_recording_generator():
  # vlen 16, T 4: segments [0,4) [4,8) [8,12) [12,16) -> draws in [0,3) [4,7) [8,11) [12,15)
  rng = _Recorder(offset=0)
  assert sample_frame_indices(16, 4, "rand", rng) == [0, 4, 8, 12]
  assert rng.calls == [(0, 3), (4, 7), (8, 11), (12, 15)]
  rng = _Recorder(offset=99)  # the largest allowed value: end - 2
  assert sample_frame_indices(16, 4, "rand", rng) == [2, 6, 10, 14]


def test_rand_one_frame_segments_use_start_without_drawing():
  # vlen 10, T 8: edges linspace(0,10,9) = 0,1.25,2.5,3.75,5,6.25,7.5,8.75,10
  # -> 0,1,2,3,5,6,7,8,10: segments [0,1) [1,2) [2,3) [3,5) [5,6) [6,7) [7,8) [8,10)
  rng = _Recorder(offset=0)
  assert sample_frame_indices(10, 8, "rand", rng) == [0, 1, 2, 3, 5, 6, 7, 8]
  assert rng.calls == [(3, 4), (8, 9)]  # only the two-frame segments draw (one choice each)
  # vlen == T: every segment has one frame.
  rng = _Recorder()
  assert sample_frame_indices(8, 8, "rand", rng) == list(range(8))
  assert rng.calls == []


def test_rand_with_numpy_generator_stays_in_bounds_and_is_reproducible():
  for vlen in (8, 9, 17, 50, 301):
    for num_frames in (1, 4, 8):
      if vlen < num_frames:
        continue
      edges = np.linspace(0, vlen, num_frames + 1).astype(int)
      seen = set()
      for seed in range(30):
        idx = sample_frame_indices(vlen, num_frames, "rand", np.random.default_rng(seed))
        assert idx == sample_frame_indices(vlen, num_frames, "rand", np.random.default_rng(seed))
        for i, (start, end) in zip(idx, zip(edges[:-1], edges[1:])):
          assert start <= i < max(end - 1, start + 1)
        seen.add(tuple(idx))
      if vlen >= 3 * num_frames:
        assert len(seen) > 1  # actually random


def test_rand_matches_generator_draws():
  # The indices are exactly the generator's integers() draws, in segment order.
  idx = sample_frame_indices(40, 4, "rand", np.random.default_rng(123))
  ref = np.random.default_rng(123)
  assert idx == [int(ref.integers(s, s + 9)) for s in (0, 10, 20, 30)]


def test_invalid_arguments():
  with pytest.raises(ValueError):
    sample_frame_indices(0, 4, "middle")
  with pytest.raises(ValueError):
    sample_frame_indices(10, 0, "middle")
  with pytest.raises(ValueError):
    sample_frame_indices(10, 4, "uniform")
