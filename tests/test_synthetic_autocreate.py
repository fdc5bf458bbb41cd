"""`synthetic_autocreate.create_if_missing`: a recipe creates its synthetic dataset once, and refuses one it
created with other settings (stale data), but never a dataset made by hand."""

import os

import pytest

from configs import demo
from input_pipeline import synthetic, synthetic_autocreate


def _config(root):
  config = demo.get_config("tiny")
  config.data_root = str(root)
  config.synthetic.update(dict(num_train=4, num_val=2, num_test=2, size=32, num_frames=8))
  return config


def test_created_once_then_stale_settings_refused(tmp_path):
  root = tmp_path / "syn"
  config = _config(root)
  synthetic_autocreate.create_if_missing(config)
  assert (root / "train.json").is_file() and (root / synthetic_autocreate.AUTO_CREATED).is_file()
  before = os.path.getmtime(root / "train.json")
  synthetic_autocreate.create_if_missing(config)  # same settings: reused as it is
  assert os.path.getmtime(root / "train.json") == before
  config.synthetic.size = 48
  with pytest.raises(ValueError, match=r"size: 32 \(config: 48\)") as err:
    synthetic_autocreate.create_if_missing(config)
  assert str(root) in str(err.value)


def test_hand_made_dataset_is_not_checked(tmp_path):
  root = tmp_path / "mine"
  synthetic.generate_dataset(str(root), num_train=2, num_val=0, num_test=2, size=32,
                             num_frames=8)
  synthetic_autocreate.create_if_missing(_config(root))  # other counts, no marker: used as it is
  assert not (root / synthetic_autocreate.AUTO_CREATED).exists()
