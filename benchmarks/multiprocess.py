"""Multi-process runs as a user gets them (`launch/local.py ... -- train`): the step time with the
preemption service's agreement against one allgather per step, and how fast a run ends when a process is
killed or the launcher gets SIGTERM.

  python benchmarks/multiprocess.py [--steps=300] [--repeats=3] [--processes=2]

Step time: configs/default.py on `--processes` processes of 1 CPU device each (mesh data=N), the two
ways of agreeing on a stop alternated `--repeats` times in this one run; each figure is the median over
repeats of the run's median tokens/s (metrics.jsonl, leaving out the first lines, which hold the
compile), and the table ends with their ratio.
Ends: a process (1, then 0) is SIGKILLed after the first checkpoint: seconds until the launcher exits,
and, without a launcher (processes joined by JAX_COORDINATOR_ADDRESS alone), until the survivor exits on
its own (peers.py); the launcher gets SIGTERM: seconds until it exits 0 with the step saved.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(workdir: str, processes: int, steps: int, checkpoint_every: int) -> list[str]:
  return ["train", f"--config={ROOT}/configs/default.py", f"--workdir={workdir}", f"--config.mesh.data={processes}",
          f"--config.train.steps={steps}", "--config.train.log_every=10", "--config.train.eval_every=100000",
          f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.sample_tokens=0"]


def launch(workdir: str, processes: int, steps: int, env: dict, checkpoint_every: int = 100000):
  command = [sys.executable, f"{ROOT}/launch/local.py", f"--processes={processes}", "--devices=1", "--",
             *train_args(workdir, processes, steps, checkpoint_every)]
  return subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def survivor_exit(processes: int, victim: int) -> tuple[float, int]:
  """Without a launcher: seconds from SIGKILL of `victim` to the exit of process 1 - victim, its code."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "w")
    procs = [subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *train_args(workdir, processes, 1_000_000, 20)],
                              env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                   "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(i),
                                   "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(processes)]
    wait_for_checkpoint(workdir, procs[0])
    start = time.monotonic()
    procs[victim].kill()
    code = procs[1 - victim].wait(timeout=300)
    seconds = time.monotonic() - start
    for p in procs:
      p.kill()
      p.wait()
    return seconds, code


def tokens_per_sec(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "tokens_per_sec" in line]
  return statistics.median(r["tokens_per_sec"] for r in rows[3:])


def step_rate(processes: int, steps: int, repeats: int) -> dict[str, list[float]]:
  ways = {"preemption service (new)": {}, "allgather every step (old)": {"JAXLM_STOP_AGREEMENT": "allgather"}}
  out = {name: [] for name in ways}
  for _ in range(repeats):
    for name, env in ways.items():
      with tempfile.TemporaryDirectory() as tmp:
        p = launch(os.path.join(tmp, "w"), processes, steps, env)
        _, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
        out[name].append(tokens_per_sec(os.path.join(tmp, "w")))
  return out


def wait_for_checkpoint(workdir: str, p: subprocess.Popen) -> None:
  while not os.path.exists(os.path.join(workdir, "checkpoints", "20", "jaxlm-manifest.json")):
    assert p.poll() is None, (p.stderr.read() if p.stderr else "")[-2000:]
    time.sleep(0.05)


def time_to_end(processes: int, how: str) -> tuple[float, int]:
  """Seconds from the kill (or SIGTERM) to the launcher's exit, and its exit code."""
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "w")
    p = launch(workdir, processes, 1_000_000, {}, checkpoint_every=20)
    wait_for_checkpoint(workdir, p)
    children = [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                               text=True).stdout.split()]
    start = time.monotonic()
    if how == "sigterm":
      p.send_signal(signal.SIGTERM)
    else:
      os.kill(children[int(how[-1])], signal.SIGKILL)
    p.communicate(timeout=300)
    return time.monotonic() - start, p.returncode


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--skip_rates", action="store_true", help="only the times to end")
  args = parser.parse_args()
  if not args.skip_rates:
    report_rates(args)
  report_ends(args)


def report_rates(args) -> None:
  rates = step_rate(args.processes, args.steps, args.repeats)
  print(f"{args.processes} processes x 1 CPU device, configs/default.py, {args.steps} steps, "
        f"median of {args.repeats} runs each (alternated):")
  for name, values in rates.items():
    print(f"  {name:30s} {statistics.median(values):9,.0f} tokens/s   runs: "
          + ", ".join(f"{v:,.0f}" for v in values))
  new, old = (statistics.median(v) for v in rates.values())
  print(f"  ratio new/old: {new / old:.3f}")


def report_ends(args) -> None:
  for how in ("kill process 1", "kill process 0", "sigterm"):
    seconds, code = time_to_end(args.processes, how.replace("kill process ", "kill"))
    print(f"  {how:30s} -> launcher exited {code} after {seconds:.1f} s")
  for victim in (1, 0):
    seconds, code = survivor_exit(2, victim)
    print(f"  no launcher, kill process {victim} -> process {1 - victim} exited {code} after {seconds:.1f} s")


if __name__ == "__main__":
  main()
