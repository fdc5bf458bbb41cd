"""A `jax.profiler` trace of a few train steps, for TensorBoard's profile plugin.

`config.profile_steps = "START:STOP"` traces the steps run after step START was reached, up
to step STOP: the steps logged as START+1 .. STOP. "10:15" traces steps 11 to 15, late
enough that compiling and the input pipeline's warm-up are over; "" (the default) traces
nothing. The steps are counted like the log's and the checkpoints' steps (micro-steps
with gradient accumulation); a run resumed past START traces nothing.

The trace is written by process 0 alone (each process would write its own host's file;
one host's view is what a profile is usually read for) into
`<workdir>/tensorboard/plugins/profile/<timestamp>/<host>.xplane.pb`: beside the run's
scalars, the folder TensorBoard's profile plugin reads (`pip install
tensorboard-plugin-profile`, then `tensorboard --logdir <workdir>/tensorboard`, Profile
tab). Device work is waited for at both ends, so the trace holds exactly the traced steps'
work, and each step is marked (`StepTraceAnnotation`) for the plugin's step view.
"""

from __future__ import annotations

import contextlib
import glob
import os

import jax
from absl import logging

HELP = ("'START:STOP' with 0 <= START < STOP traces the steps after step START up to step "
        "STOP (e.g. '10:15': steps 11 to 15); '' traces nothing")


def parse_profile_steps(value) -> tuple[int, int] | None:
  """`config.profile_steps` as (START, STOP), or None when empty; ValueError if malformed."""
  if value is None or str(value).strip() == "":
    return None
  start, sep, stop = str(value).strip().partition(":")
  try:
    bounds = (int(start), int(stop)) if sep else None
  except ValueError:
    bounds = None
  if bounds is None or not 0 <= bounds[0] < bounds[1]:
    raise ValueError(f"profile_steps={value!r} is not valid: {HELP}")
  return bounds


class StepProfiler:
  """Starts a trace when the loop reaches step START and stops it at step STOP."""

  def __init__(self, profile_steps, log_dir: str, *, enabled: bool = True):
    self.steps = parse_profile_steps(profile_steps) if enabled else None
    self.log_dir = log_dir
    self.active = False

  def start_if_due(self, step: int, state) -> None:
    """Called before each step with the number of steps done so far."""
    if self.steps is None or self.active or step != self.steps[0]:
      return
    jax.block_until_ready(state)  # earlier steps' device work stays out of the trace
    try:
      jax.profiler.start_trace(self.log_dir)
    except Exception as e:  # noqa: BLE001 (a profile is not worth the run: say so, train on)
      print(f"Warning: profiling not started ({type(e).__name__}: {e}); training goes on",
            flush=True)
      self.steps = None
      return
    self.active = True

  def annotate(self, step: int):
    """Marks the work of step `step` (the step about to run, counted from 1) in the trace."""
    if not self.active:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def stop_if_due(self, step: int, state) -> None:
    """Called after each step with the number of steps done so far."""
    if self.active and step >= self.steps[1]:
      self.stop(state, last_step=step)

  def stop(self, state=None, *, last_step: int | None = None) -> None:
    """Writes the trace (also when the loop ends, is preempted or fails mid-range)."""
    if not self.active:
      return
    self.active = False
    try:
      if state is not None:
        jax.block_until_ready(state)  # the last traced step's device work, in full
      jax.profiler.stop_trace()
    except Exception as e:  # noqa: BLE001 (a lost trace must not hide the run's own error)
      logging.warning("Writing the profile failed: %s", e)
      return
    runs = sorted(glob.glob(os.path.join(self.log_dir, "plugins", "profile", "*")),
                  key=os.path.getmtime)
    where = runs[-1] if runs else self.log_dir
    steps = f"steps {self.steps[0] + 1}-{last_step}" if last_step else "the traced steps"
    print(f"Profile of {steps} written to {where} (open it with: tensorboard --logdir "
          f"{self.log_dir}, Profile tab)", flush=True)
