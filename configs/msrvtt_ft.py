r"""Fine-tuning for MSR-VTT retrieval (9k train, 1k test), VTC + VTM.

  python main.py --config configs/msrvtt_ft.py --workdir runs/msrvtt \
      --config.data_root=/path/to/data --config.init_from=runs/pt5m

Paper setting (SPEC 7): 5 epochs, 0.5 warmup, lr 1e-5 -> 1e-6, batch 32 x 4 GPUs
(VindLU's objective and LR schedule on that many GPUs: `protocol='vindlu'`),
12 training and 12 inference frames, text length 32. Target (T2V2T, 5M pretraining):
text-to-video R@1 44.4, R@5 70.7, R@10 79.5. Expects `{data_root}/anno/msrvtt_ret_train9k.json`,
`{data_root}/anno/msrvtt_ret_test1k.json` and videos under `{data_root}/videos/msrvtt`.
On one v5e chip (Colab; compiled, not run; docs/scaling.md): add
`--config.batch_size=32 --config.optimizer.grad_accum_steps=4` (13.46 of the 15.75 usable
GiB; 64 clips a step do not fit).
"""

from configs import common
from input_pipeline.config import corpus_config


def get_config(arg=None):
  c = common.finetune_config(gpus=4, epochs=5, max_len=32)
  root = c.get_ref("data_root")
  c.data.train_corpora = [corpus_config("msrvtt_9k", root + "/anno/msrvtt_ret_train9k.json",
                                        root + "/videos/msrvtt")]
  c.data.eval_corpora = [corpus_config("msrvtt_1k", root + "/anno/msrvtt_ret_test1k.json",
                                       root + "/videos/msrvtt")]
  return common.finalize(c, arg)
