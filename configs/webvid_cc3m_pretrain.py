r"""Pretraining on the 5M corpus: WebVid-2.5M videos + CC3M images (1-frame clips).

  python main.py --config configs/webvid_cc3m_pretrain.py --workdir runs/pt5m \
      --config.data_root=/path/to/data

The paper's pretraining (SPEC 7): ~5.5M pairs, 10,175 steps per epoch at global batch
512 (64 x 8 GPUs), 10 epochs with 1 warmup, lr 1e-4 -> 1e-6, 4 frames; each batch is all
video or all images. Expects `{data_root}/anno/webvid_2.5m_train.json`,
`{data_root}/anno/cc3m_train.json`, videos under `videos/webvid`, images under
`images/cc3m`. Fine-tuned from this, T2V2T reaches R@1 44.4 (MSR-VTT), 56.0 (DiDeMo),
52.1 (ActivityNet).
The objective and LR schedule are webvid_pretrain.py's: VindLU's on the poster's 8 GPUs of
64 (`protocol='vindlu'`). On TPU: as configs/webvid_pretrain.py (its video batches compile
to the same program).
"""

from configs import common, webvid_pretrain
from input_pipeline.config import corpus_config


def get_config(arg=None):
  c = webvid_pretrain.get_config(None)
  root = c.get_ref("data_root")
  c.data.train_corpora = [
      corpus_config("webvid_2.5m", root + "/anno/webvid_2.5m_train.json", root + "/videos/webvid"),
      corpus_config("cc3m", root + "/anno/cc3m_train.json", root + "/images/cc3m", kind="image"),
  ]
  return common.finalize(c, arg)
