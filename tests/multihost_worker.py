r"""One process of a multi-host test run: `main.py`, plus a simulated preemption.

  python tests/multihost_worker.py --config configs/msrvtt_ft.py:tiny --workdir W \
      --config.multihost.enabled=True --config.multihost.coordinator_address=127.0.0.1:PORT \
      --config.multihost.num_processes=2 --config.multihost.process_id=0 \
      --preempt_after_checkpoint=2

takes every flag of `main.py`. With `--preempt_after_checkpoint=N` the run stops right
after the checkpoint of step N is complete on disk, as a preempted job would (every process
stops at the same step, so none waits on a collective that never comes); rerunning the same
command without the flag resumes from that checkpoint. Used by tests/test_multihost.py.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main as main_lib  # noqa: E402  (the repository's main.py)

_PREEMPT = flags.DEFINE_integer("preempt_after_checkpoint", 0,
                                "Stop the run once the checkpoint of this step is written.")


class Preempted(Exception):
  pass


def _install_preemption(step_to_stop: int) -> None:
  from t2v2t_jax.checkpoints import run_checkpoints  # noqa: PLC0415

  save = run_checkpoints.Checkpointer.save

  def save_then_stop(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if step == step_to_stop:
      self.close()  # the checkpoint is complete on every process before we stop
      raise Preempted(step)
    return saved

  run_checkpoints.Checkpointer.save = save_then_stop


def run(argv):
  if _PREEMPT.value:
    _install_preemption(_PREEMPT.value)
  try:
    main_lib.main(argv)
  except Preempted as e:
    print(f"Preempted after the checkpoint of step {e.args[0]}", flush=True)


if __name__ == "__main__":
  app.run(run)
