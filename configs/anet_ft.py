r"""Fine-tuning for ActivityNet Captions paragraph retrieval (val_1), VTC + VTM.

  python main.py --config configs/anet_ft.py --workdir runs/anet \
      --config.data_root=/path/to/data --config.init_from=runs/pt5m

Paper setting (SPEC 7): 10 epochs, 0.5 warmup, lr 1e-5 -> 1e-6, batch 32 x 1 GPU
(VindLU's objective and LR schedule on that many GPUs: `protocol='vindlu'`),
12 training frames and 32 inference frames (temporal embeddings interpolated), text
length 64, paragraphs. 4,917 test videos: the rerank's video tokens are re-encoded rather
than cached (`eval.token_cache='auto'` picks 'recompute' above `eval.token_memory_gib`).
Evaluates every epoch and keeps the best epoch by val_1's r_mean (VindLU's stop_key). Target (T2V2T, 5M pretraining): R@1 52.1, R@5 79.4, R@10 88.2.
On one v5e chip (Colab; compiled, not run; docs/scaling.md): training as is (the step is
didemo_ft's: 12.45 of the 15.75 usable GiB); the 32-frame evaluation needs
`--config.eval.video_batch_size=8 --config.eval.rerank_batch_size=32`.
"""

from configs import common
from input_pipeline.config import corpus_config


def get_config(arg=None):
  c = common.finetune_config(gpus=1, epochs=10, max_len=64, eval_frames=32)
  root = c.get_ref("data_root")
  c.data.train_corpora = [corpus_config("anet_train", root + "/anno/anet_ret_train.json",
                                        root + "/videos/activitynet", paragraph=True)]
  c.data.eval_corpora = [corpus_config("anet_val1", root + "/anno/anet_ret_val_1.json",
                                       root + "/videos/activitynet", paragraph=True)]
  c.best_key = "anet_val1/r_mean"  # VindLU's stop_key 'test/': its val_1 file, the one reported
  return common.finalize(c, arg)
