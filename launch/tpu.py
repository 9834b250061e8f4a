"""Runs jaxlm on a Cloud TPU VM pod through the gcloud CLI: create, setup, run, status, delete.

  python launch/tpu.py create --name=pod --zone=us-east5-a --accelerator=v5p-16 [--spot|--reserved]
  python launch/tpu.py setup  --name=pod --zone=us-east5-a
  python launch/tpu.py run    --name=pod --zone=us-east5-a -- train --config=configs/default.py --workdir=gs://B/run
  python launch/tpu.py status --name=pod --zone=us-east5-a
  python launch/tpu.py delete --name=pod --zone=us-east5-a

create: a TPU VM (`tpu-vm create`), or with --spot / --reserved a queued resource of one node of the
  same name, waited for until ACTIVE (--timeout). --version defaults to Google's runtime for the family.
setup: the files git knows of in this checkout (tracked, and untracked ones not ignored) go to
  ~/jaxlm on every worker, which gets a venv with `pip install -e '.[tpu]'` (Python 3.11, from apt
  if the image lacks it: TPU images are Ubuntu 22.04 with Python 3.10, which jaxlm cannot use).
run: the same `jaxlm ARGS` on every worker (in ~/jaxlm, so relative paths are the checkout's), with
  JAXLM_DISTRIBUTED=auto so that JAX finds the pod; one local `gcloud ... ssh --worker=i` per worker,
  its output in LOGS/worker-<i>.log (worker 0's on the terminal too). Give an absolute or gs:// workdir
  that every worker shares. The worker count is asked of `describe` unless --workers=N gives it.
  A worker that fails is named, and the run is ended on every worker (SIGTERM, then SIGKILL); the
  launcher exits non-zero. SIGINT (Ctrl-C) or SIGTERM to the launcher reaches jaxlm on every worker
  as SIGTERM: each finishes its step, they save a checkpoint together and exit 0; a second Ctrl-C
  kills them without saving. Rerunning the same command resumes.
delete: the queued resource (with its node) when NAME is one (asked of gcloud, or say --queued),
  else the TPU VM.
--dry_run prints the gcloud commands, one a line, and runs nothing ('#' lines: what is run only on a
failure or a signal, and the check delete makes); `run --dry_run` needs --workers=N.
User mistakes end in one line `tpu: error: ...` and exit code 2.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import procs as procs_lib  # launch/procs.py (scripts here run as `python launch/x.py`)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "jaxlm-src.tar.gz"  # the checkout, as copied to every worker's home
PID_FILE = "~/.jaxlm-run.pid"  # on each worker: the pid of its jaxlm, for signals
POLL_SECONDS = 10  # between two looks at a queued resource that is not ACTIVE yet
SSH_SECONDS = 60  # the most a `ssh --worker=all` that signals the workers may take
# Google's TPU software versions for JAX, by accelerator family (https://cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5e": "v2-alpha-tpuv5-lite", "v4": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
            "v2": "tpu-ubuntu2204-base"}


class UserError(Exception):
  """A mistake of the user's: one line `tpu: error: ...`, exit code 2."""


class Failed(Exception):
  """Something outside went wrong (gcloud, a queued resource): one line `tpu: error: ...`, exit code 1."""


class ForcedStop(Exception):
  """A second SIGINT: the workers are killed without saving."""


class Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(message)


# ---- gcloud command lines


def tpu_vm(verb: str, args, *flags: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}", *flags]


def queued(verb: str, args, *flags: str) -> list[str]:
  return ["gcloud", "alpha", "compute", "tpus", "queued-resources", verb, args.name, f"--zone={args.zone}", *flags]


def ssh(args, worker: int | str, command: str) -> list[str]:
  return tpu_vm("ssh", args, f"--worker={worker}", f"--command={command}")


def call(args, argv: list[str]) -> None:
  """Runs a gcloud command that changes something (printed first); with --dry_run only prints it."""
  print(shlex.join(argv) if args.dry_run else f"+ {shlex.join(argv)}", flush=True,
        file=sys.stdout if args.dry_run else sys.stderr)
  if not args.dry_run and (code := subprocess.run(argv, stdin=subprocess.DEVNULL).returncode):
    raise Failed(f"`gcloud {' '.join(argv[1:5])} ...` exited with code {code} (gcloud's message is above)")


def describe(args, argv: list[str]) -> dict:
  """gcloud's JSON description of the TPU or queued resource; a UserError (name, zone?) if it has none."""
  done = subprocess.run([*argv, "--format=json"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
  if done.returncode:
    lines = done.stderr.strip().splitlines() or ["(nothing)"]
    said = next((line for line in lines if line.startswith("ERROR:")), lines[-1])  # (its first line of several)
    raise UserError(f"gcloud cannot describe {args.name!r} in zone {args.zone!r}: {said}")
  return json.loads(done.stdout)


# ---- create, status, delete


def default_version(accelerator: str) -> str:
  family = accelerator.split("-")[0]
  if family not in RUNTIMES:
    raise UserError(f"no default runtime for --accelerator={accelerator} (give --version=RUNTIME, "
                    "see https://cloud.google.com/tpu/docs/runtimes)")
  return RUNTIMES[family]


def create(args) -> int:
  version = args.version or default_version(args.accelerator)
  if not (args.spot or args.reserved):
    call(args, tpu_vm("create", args, f"--accelerator-type={args.accelerator}", f"--version={version}"))
    return 0
  call(args, queued("create", args, f"--node-id={args.name}", f"--accelerator-type={args.accelerator}",
                    f"--runtime-version={version}", "--spot" if args.spot else "--reserved"))
  if args.dry_run:
    print(shlex.join([*queued("describe", args), "--format=json"]) + "  # until ACTIVE")
  elif args.timeout > 0:
    wait_until_active(args)
  return 0


def wait_until_active(args) -> None:
  """Polls the queued resource until it is ACTIVE; a Failed when it fails or --timeout passes."""
  deadline = time.monotonic() + args.timeout
  while True:
    state = describe(args, queued("describe", args)).get("state", {}).get("state", "UNKNOWN")
    if state == "ACTIVE":
      print(f"tpu: queued resource {args.name} is ACTIVE", file=sys.stderr, flush=True)
      return
    if state in ("FAILED", "SUSPENDED"):
      raise Failed(f"queued resource {args.name} is {state} (delete it: tpu.py delete --name={args.name} "
                   f"--zone={args.zone})")
    if time.monotonic() > deadline:
      raise Failed(f"queued resource {args.name} is still {state} after {args.timeout} s; it stays queued "
                   f"(tpu.py status, or tpu.py delete, --name={args.name} --zone={args.zone})")
    print(f"tpu: queued resource {args.name} is {state}; waiting", file=sys.stderr, flush=True)
    time.sleep(POLL_SECONDS)


def status(args) -> int:
  if args.dry_run:
    print(shlex.join([*tpu_vm("describe", args), "--format=json"]))
    return 0
  node = describe(args, tpu_vm("describe", args))
  print(f"{args.name} ({args.zone}): {node.get('state', 'UNKNOWN')}, {node.get('acceleratorType', '?')}, "
        f"{len(node.get('networkEndpoints', []))} workers, runtime {node.get('runtimeVersion', '?')}")
  return 0


def delete(args) -> int:
  if args.dry_run and not args.queued:
    print(f"# {shlex.join([*queued('describe', args), '--format=json'])}  (succeeds for a queued resource)")
  probe = [*queued("describe", args), "--format=json"]
  is_queued = args.queued or (not args.dry_run and subprocess.run(
      probe, capture_output=True, stdin=subprocess.DEVNULL).returncode == 0)
  call(args, queued("delete", args, "--force", "--quiet") if is_queued else tpu_vm("delete", args, "--quiet"))
  return 0


# ---- setup


def checkout_files() -> list[str]:
  """The files of this checkout that git knows of: tracked (and present), and untracked but not ignored."""
  if not os.path.isdir(os.path.join(ROOT, ".git")) or not shutil.which("git"):
    raise UserError(f"setup copies the files git knows of, and {ROOT} is not a git checkout (or git is missing)")
  listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, text=True, check=True).stdout
  return sorted({name for name in listed.split("\0") if name and os.path.isfile(os.path.join(ROOT, name))})


def make_archive(path: str) -> None:
  names = checkout_files()
  with tarfile.open(path, "w:gz") as tar:
    for name in names:
      tar.add(os.path.join(ROOT, name), arcname=name, recursive=False)
  print(f"tpu: {len(names)} files of {ROOT} in {path} ({os.path.getsize(path) / 1e6:.1f} MB)", file=sys.stderr)


def setup_command(python: str) -> str:
  """What each worker runs: unpack into ~/jaxlm, get `python` (apt) if missing, a venv, pip install."""
  py = shlex.quote(python)
  return " && ".join([
      "mkdir -p ~/jaxlm", f"tar -xzf ~/{ARCHIVE} -C ~/jaxlm", "cd ~/jaxlm",
      f"{{ command -v {py} >/dev/null || {{ sudo apt-get -qq update && sudo apt-get -qq install -y {py}-venv; }}; }}",
      f"{py} -m venv .venv", ".venv/bin/pip install -q -e '.[tpu]'"])


def setup(args) -> int:
  # A folder of its own: two setups at once (of one pod name, or by two users) never share the archive.
  folder = None if args.dry_run else tempfile.mkdtemp(prefix="jaxlm-src-")
  archive = os.path.join(folder or os.path.join(tempfile.gettempdir(), "jaxlm-src-XXXXXXXX"), f"{args.name}.tar.gz")
  if folder:
    make_archive(archive)
  try:
    call(args, ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{args.name}:~/{ARCHIVE}",
                f"--zone={args.zone}", "--worker=all"])
    call(args, ssh(args, "all", setup_command(args.python)))
  finally:
    if folder:
      shutil.rmtree(folder)
  return 0


# ---- run


def remote_command(command: list[str]) -> str:
  """jaxlm on a worker, in the checkout, with its pid recorded for signals, JAX to find the pod."""
  return (f"cd ~/jaxlm && echo $$ > {PID_FILE} && exec env JAXLM_DISTRIBUTED=auto ~/jaxlm/.venv/bin/jaxlm "
          f"{shlex.join(command)}")


def signal_command(sig: str) -> str:
  """Signals a worker's jaxlm by its recorded pid, if that process is still a jaxlm (pids get reused)."""
  return (f"pid=$(cat {PID_FILE} 2>/dev/null) && grep -qa jaxlm /proc/$pid/cmdline 2>/dev/null && "
          f"kill -{sig} $pid; true")


def worker_count(args) -> int:
  if args.workers:
    return args.workers
  if args.dry_run:
    raise UserError("run --dry_run needs --workers=N (the count that `describe` gives a real run)")
  node = describe(args, tpu_vm("describe", args))
  if node.get("state") != "READY":
    raise Failed(f"TPU {args.name} in {args.zone} is {node.get('state', 'UNKNOWN')}, not READY")
  return len(node.get("networkEndpoints", []))


def logs_folder(args) -> str:
  folder = args.logs or os.path.join("logs", f"tpu-{args.name}-{time.strftime('%Y%m%d-%H%M%S')}")
  os.makedirs(folder, exist_ok=True)
  return os.path.abspath(folder)


def tee(source, log, terminal) -> threading.Thread:
  """A thread copying worker 0's output to its log and to the terminal as it comes."""
  def copy():
    while chunk := os.read(source.fileno(), 65536):
      for out in (log, terminal):
        out.write(chunk)
        out.flush()
  thread = threading.Thread(target=copy, daemon=True)
  thread.start()
  return thread


def start_workers(argvs: list[list[str]], logs: str) -> tuple[list[subprocess.Popen], threading.Thread]:
  """One ssh per worker, each in its own process group (a terminal's Ctrl-C reaches the launcher alone,
  which forwards it once) and writing to LOGS/worker-<i>.log."""
  procs, copier = [], None
  for i, argv in enumerate(argvs):
    log = open(os.path.join(logs, f"worker-{i}.log"), "wb")  # noqa: SIM115 (the child and tee hold it)
    out = subprocess.PIPE if i == 0 else log
    procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  process_group=0))
    if i == 0:
      copier = tee(procs[0].stdout, log, sys.stdout.buffer)
  return procs, copier


def signal_workers(args, sig: str) -> None:
  """`kill -SIG` to jaxlm on every worker, waited for up to SSH_SECONDS."""
  forward = subprocess.Popen(ssh(args, "all", signal_command(sig)), stdin=subprocess.DEVNULL, process_group=0)
  if not procs_lib.wait_all([forward], SSH_SECONDS):
    procs_lib.kill([forward])


def end_run(args, procs: list[subprocess.Popen]) -> None:
  """Ends jaxlm on every worker: SIGTERM, SIGKILL after GRACE_SECONDS; then any ssh still open."""
  signal_workers(args, "TERM")
  if not procs_lib.wait_all(procs, procs_lib.GRACE_SECONDS):
    signal_workers(args, "KILL")
    if not procs_lib.wait_all(procs, procs_lib.GRACE_SECONDS):
      procs_lib.kill(procs)


class Forward:
  """Signal handler: the first SIGINT or SIGTERM becomes SIGTERM to jaxlm on every worker (which saves
  and exits 0); a second SIGINT raises ForcedStop. The forwarding ssh runs in the background."""

  def __init__(self, args):
    self.args, self.sent = args, []

  def __call__(self, signum, frame):
    name = signal.Signals(signum).name
    if not self.sent:
      print(f"\ntpu: {name}: asking jaxlm on every worker to save a checkpoint and stop (Ctrl-C again: kill "
            "without saving)", file=sys.stderr, flush=True)
      self.sent.append(subprocess.Popen(ssh(self.args, "all", signal_command("TERM")),
                                        stdin=subprocess.DEVNULL, process_group=0))
    elif signum == signal.SIGINT:
      raise ForcedStop


def print_run(args, argvs: list[list[str]]) -> None:
  for argv in argvs:
    print(shlex.join(argv))
  print(f"# on SIGINT/SIGTERM: {shlex.join(ssh(args, 'all', signal_command('TERM')))}")
  print(f"# when a worker fails: the same, then after {procs_lib.GRACE_SECONDS} s: "
        f"{shlex.join(ssh(args, 'all', signal_command('KILL')))}")


def run(args) -> int:
  if not args.command:
    raise UserError("run needs a jaxlm command after --, e.g. run --name=N --zone=Z -- train --config=... "
                    "--workdir=gs://BUCKET/run")
  count = worker_count(args)
  argvs = [ssh(args, i, remote_command(args.command)) for i in range(count)]
  if args.dry_run:
    print_run(args, argvs)
    return 0
  logs = logs_folder(args)
  print(f"tpu: jaxlm on {count} workers of {args.name}; worker 0 below, each worker's output in "
        f"{logs}/worker-<i>.log", file=sys.stderr, flush=True)
  procs, copier = start_workers(argvs, logs)
  forward = Forward(args)
  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)

  def failure(i: int, code: int) -> str:
    return (f"tpu: worker {i} of {count} {procs_lib.how(code)} (its log: {logs}/worker-{i}.log); "
            "ending the run on every worker")
  try:
    code = procs_lib.supervise(procs, failure, lambda procs: end_run(args, procs))
  except ForcedStop:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a third Ctrl-C changes nothing)
    print("\ntpu: second SIGINT: killing jaxlm on every worker without saving", file=sys.stderr, flush=True)
    signal_workers(args, "KILL")
    if not procs_lib.wait_all(procs, procs_lib.GRACE_SECONDS):
      procs_lib.kill(procs)
    code = 130
  for sig in (signal.SIGINT, signal.SIGTERM):  # the run is over: what is left to wait for is short
    signal.signal(sig, signal.SIG_IGN)
  copier.join(timeout=5)
  procs_lib.wait_all(forward.sent, SSH_SECONDS)
  return code


# ---- command line


def parser() -> Parser:
  top = Parser(prog="tpu.py", description=__doc__.splitlines()[0])
  commands = top.add_subparsers(dest="subcommand", required=True, metavar="COMMAND", parser_class=Parser)

  def command(name: str, help: str) -> Parser:
    sub = commands.add_parser(name, help=help, description=help)
    sub.add_argument("--name", required=True, help="the TPU (and queued resource) name")
    sub.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-west4-a (v5e)")
    sub.add_argument("--dry_run", action="store_true", help="print the gcloud commands, run nothing")
    return sub

  make = command("create", "create a TPU VM, or a queued resource (--spot, --reserved)")
  make.add_argument("--accelerator", required=True, help="e.g. v5litepod-16, v5p-16, v6e-16, v4-32")
  make.add_argument("--version", help="TPU software version (default: Google's for the family)")
  kind = make.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="a queued resource of spot capacity")
  kind.add_argument("--reserved", action="store_true", help="a queued resource from your reservation")
  make.add_argument("--timeout", type=int, default=3600, help="seconds to wait for a queued resource to be "
                    "ACTIVE (0: do not wait)")
  install = command("setup", "copy this checkout to every worker and pip install it there")
  install.add_argument("--python", default="python3.11", help="the workers' interpreter for the venv "
                       "(installed with apt if missing; Python >= 3.11)")
  launch = command("run", "run `jaxlm ARGS` on every worker: run --name=N --zone=Z -- ARGS")
  launch.add_argument("--logs", help="local folder for worker-<i>.log (default: logs/tpu-NAME-TIME)")
  launch.add_argument("--workers", type=int, help="the worker count (default: asked of gcloud describe)")
  command("status", "print the TPU's state and worker count")
  remove = command("delete", "delete the TPU VM, or the queued resource and its node")
  remove.add_argument("--queued", action="store_true", help="it is a queued resource (else gcloud is asked)")
  return top


def parse(argv: list[str]) -> argparse.Namespace:
  """The flags before `--` go to argparse; what follows is the jaxlm command of `run`."""
  own, args_command = procs_lib.split_command(argv)
  args = parser().parse_args(own)
  args.command = args_command
  if args.subcommand != "run" and len(own) < len(argv):
    raise UserError(f"only run takes a command after --, not {args.subcommand}")
  if "--dry_run" in args.command:  # (jaxlm has no such flag: a dry run asked for in the wrong place)
    raise UserError("--dry_run after -- would go to jaxlm and run for real; put it before --")
  if getattr(args, "workers", None) is not None and args.workers < 1:
    raise UserError(f"--workers={args.workers}: need at least 1")
  return args


def main(argv: list[str] | None = None) -> int:
  try:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not args.dry_run and not shutil.which("gcloud"):
      raise UserError("gcloud is not on PATH (install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install)")
    return {"create": create, "setup": setup, "run": run, "status": status, "delete": delete}[args.subcommand](args)
  except UserError as e:
    print(f"tpu: error: {e}", file=sys.stderr)
    return 2
  except Failed as e:
    print(f"tpu: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
