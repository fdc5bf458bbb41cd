"""Preemption: on SIGTERM, every process saves a checkpoint at the same step and stops.

Spot/preemptible TPU VMs, SLURM and Kubernetes all announce the end of a job with SIGTERM
and kill it (SIGKILL) some seconds later. Regular checkpoints come only every
`checkpoint_every` steps, so without this a preempted run would lose up to that many steps.
With it, the train loop asks `PreemptionWatch.should_stop(step)` once per step; when it says
yes, the loop saves that step and raises `Preempted`, and `main.py` prints the exception's
one line and exits with `EXIT_CODE`. Rerunning the same command resumes from the checkpoint
(state, data iterator and bad-data counts: the run continues exactly). docs/preemption.md
has the operator's side.

Two ways of noticing, chosen once per run:
- multi-process (`jax.distributed` initialised): JAX's preemption sync manager.
  `jax.distributed.initialize` installs a C++ SIGTERM handler (XLA's "sigterm" preemption
  notifier, polled once a second) on every process; the first process to get the signal
  tells the coordination service, every process reports the last step it passed to
  `multihost_utils.reached_preemption_sync_point`, and they all agree on the next step
  after the largest of those. Only that step returns True, on every process, so a process
  that got SIGTERM alone never saves a step the others do not (the save is a collective: a
  lone save would hang). A Python handler here would replace the C++ one and break that,
  so none is installed. This works on CPUs (Gloo) as on TPUs: the protocol runs over the
  coordination service, not over the devices.
- one process: a plain Python SIGTERM handler that sets a flag, read at the end of the
  step; the previous handler comes back when the loop ends (a SIGTERM during the final
  evaluation then stops the process as before: training is complete and saved).
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry". Apart
# from 143 (128 + SIGTERM), what a shell reports for a process SIGTERM killed outright, so
# "stopped cleanly, checkpoint saved" and "killed, progress since the last regular
# checkpoint lost" can be told apart by a scheduler's retry rule.
EXIT_CODE = os.EX_TEMPFAIL if hasattr(os, "EX_TEMPFAIL") else 75


class Preempted(Exception):
  """Training stopped for a preemption notice after saving `checkpoint` at `step`."""

  def __init__(self, step: int, checkpoint: str):
    super().__init__(f"Preempted (SIGTERM) at step {step}: saved checkpoint {checkpoint}; "
                     "rerun the same command to resume")
    self.step = step
    self.checkpoint = checkpoint


def _sync_manager_available() -> bool:
  """Whether `reached_preemption_sync_point` works: `jax.distributed` is initialised with
  its preemption service (on by default; `jax_enable_preemption_service` turns it off)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatch:
  """Says, once per step, whether every process should save this step and stop.

  `should_stop(step)` must be called at every step, by every process, with the same
  increasing step numbers (the sync protocol picks a step it has not yet been given)."""

  def __init__(self):
    self.synced = _sync_manager_available()
    self._requested = False
    self._previous_handler = None
    self._installed = False
    if self.synced:
      return  # JAX's own SIGTERM handler is in place (see the module docstring)
    if jax.process_count() > 1:
      logging.warning("Several processes without JAX's preemption service "
                      "(jax_enable_preemption_service=False): SIGTERM is not handled and "
                      "stops the run without a checkpoint.")
      return
    if threading.current_thread() is not threading.main_thread():
      # Python delivers signals to the main thread only: a trainer run from another thread
      # (a notebook's worker, say) keeps the default SIGTERM behaviour.
      logging.warning("Training outside the main thread: SIGTERM is not handled.")
      return
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True

  def _on_sigterm(self, signum, frame):
    del signum, frame
    # Only a flag: the step in flight finishes, and the loop saves at its end.
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if self.synced:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._installed:
      # None: the previous handler was not set from Python; the default is the best guess.
      previous = self._previous_handler
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
      self._installed = False
