"""train.profile_steps: a jax.profiler trace of a window of training steps, in WORKDIR/profile.

jax.profiler writes plugins/profile/<time>/<host>.xplane.pb (and a .trace.json.gz) under the folder it
is given; TensorBoard's profile plugin and XProf read it. The profiler writes local files only, so for a
bucket workdir the trace goes to a temporary folder first and is copied up when it stops. With several
processes each traces itself, into WORKDIR/profile/process_<i>.
"""

import os
import shutil
import tempfile

import jax

from jaxlm import files


class StepProfiler:
  """Starts the trace before step START (or before the first step of a run resumed inside the window)
  and stops it once step STOP is done, or when the run stops or fails before that."""

  def __init__(self, window: tuple[int, int] | None, workdir: str, message):
    self.window, self.message = window, message
    self.target = files.join(workdir, "profile")
    if jax.process_count() > 1:
      self.target = files.join(self.target, f"process_{jax.process_index()}")
    self.folder: str | None = None  # where the open trace writes; None when no trace is open
    self.first = self.last = 0  # the steps traced so far

  def before(self, step: int) -> None:
    """Step `step` (counted from 1) is about to be dispatched."""
    if self.window is None or not self.window[0] <= step <= self.window[1]:
      return
    if self.folder is None:
      self.folder = tempfile.mkdtemp(prefix="jaxlm-profile-") if files.is_remote(self.target) else self.target
      jax.profiler.start_trace(self.folder)
      self.first = step
    self.last = step

  def after(self, step: int, outputs, watchdog) -> bool:
    """Stops the trace once the window's last step, `step`, has run (waits for `outputs`, that step's);
    True when it stopped (the time it took is not a training step's)."""
    if self.folder is None or step != self.window[1]:
      return False
    jax.block_until_ready(outputs)
    self.stop(watchdog)
    return True

  def stop(self, watchdog) -> None:
    """Writes the open trace, if there is one (also when the run stops or fails inside the window)."""
    if self.folder is None:
      return
    # Writing (and copying) a trace of large steps can take minutes: as long as a compile is given.
    watchdog.beat(f"writing the profile of steps {self.first} to {self.last}", compiling=True)
    folder, self.folder = self.folder, None
    jax.profiler.stop_trace()
    if folder != self.target:
      copy_tree(folder, self.target)
      shutil.rmtree(folder)
    self.message(f"profile of steps {self.first} to {self.last} in {self.target} "
                 f"(view it: tensorboard --logdir={self.target}, or xprof)")


def copy_tree(local: str, target: str) -> None:
  """Every file under the local folder `local` to the same relative path under `target` (a bucket)."""
  for folder, _, names in os.walk(local):
    for name in names:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, local).split(os.sep)
      files.write_bytes(files.join(target, *relative), files.read_bytes(path))
