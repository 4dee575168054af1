"""launch: how a training's ranks are started, on one machine or on a hostfile's nodes, and stopped.

One process on this machine runs `python -m model.train` itself; more (pretrain.num_gpus) run
under DeepSpeed's launcher; with pretrain.hostfile, DeepSpeed's multi-node runner starts one rank
group per node through pretrain.launcher (pdsh: over ssh, on pretrain.ssh_port), limited by
pretrain.include / exclude, the nodes meeting at pretrain.master_addr (default: the first node's
address).

Before a multi-node launch every node is checked (check_hostfile), so a node that is down, or
whose ssh server listens on another port, fails the stage at once with the node, the port and
what to change, not minutes later inside pdsh. The environment forja gives its ranks (threads,
allocator, compiled-op cache, accelerator, import path, MLflow run) reaches the other nodes
through DeepSpeed's env file (DS_ENV_FILE), which forja writes for each launch.

Imports stay light (torch, mlflow and DeepSpeed only inside functions): the hostfile check runs
before anything heavy is loaded.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

# What forja sets for its ranks (child_env) and the user's settings for the same libraries:
# written to DeepSpeed's env file for the other nodes. Never FORJA_PARENT_PID: a pid of this
# machine, meaningless there (see run_training for what stops remote ranks).
REMOTE_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "PYTHONPATH",
               "PYTHONUNBUFFERED", "DO_NOT_TRACK", "HF_HOME", "FORJA_PEAK_FLOPS")
REMOTE_PREFIXES = ("MALLOC_", "MLFLOW_", "GLOO_", "NCCL_")
# Characters DeepSpeed's runner cannot pass through the remote shell's `export K="V"` unchanged.
UNSAFE = re.compile(r'["$`\\\n]')
LAUNCH_KEYS = ("hostfile", "launcher", "ssh_port", "include", "exclude", "master_addr")  # where ranks run, not what they train
SSH_LAUNCHERS = ("pdsh",)  # the launchers that reach the nodes over ssh themselves
OTHER_SSH_PORTS = (22, 2222, 2022, 222)  # where a misconfigured node's sshd is looked for


def rank_threads(cfg) -> int:
    """Torch threads per rank: the machine's share (set deliberately: oversubscription is slow)."""
    return max(1, (cfg.threads or os.cpu_count() or 1) // cfg.num_gpus)


def read_hostfile(path: str) -> dict[str, int]:
    """host -> slots of a DeepSpeed hostfile ('HOST slots=N' a line, 1 without slots=; # comments)."""
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"pretrain.hostfile {path} does not exist")
    slots = {}
    for line in f.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            host, *rest = line.split()
            slots[host] = next((int(x[6:]) for x in rest if x.startswith("slots=") and x[6:].isdigit()), 1)
    if not slots:
        raise ValueError(f"pretrain.hostfile {path} lists no hosts (one 'HOST slots=N' a line)")
    return slots


def hostfile_hosts(path: str) -> list[str]:
    return list(read_hostfile(path))


def named_slots(value: str) -> dict[str, int | None]:
    """DeepSpeed's include/exclude form 'host1@host2:0,1': host -> how many slots it names (None: all)."""
    return {p.split(":")[0]: len(p.split(":")[1].split(",")) if ":" in p else None for p in value.split("@") if p}


def active_hosts(hosts: list[str], include: str = "", exclude: str = "") -> list[str]:
    """The hosts DeepSpeed will use after --include / --exclude: a host named with slots in
    exclude keeps its other slots."""
    if include and exclude:
        raise ValueError("pretrain.include and pretrain.exclude are both set; DeepSpeed takes one of them")
    for key, value in (("include", include), ("exclude", exclude)):
        if unknown := [h for h in named_slots(value) if h not in hosts]:
            raise ValueError(f"pretrain.{key} names {', '.join(unknown)}, not in the hostfile ({', '.join(hosts)})")
    if include:
        return [h for h in hosts if h in named_slots(include)]
    gone = {h for h, n in named_slots(exclude).items() if n is None}
    return [h for h in hosts if h not in gone]


def hostfile_slots(path: str, include: str = "", exclude: str = "") -> int:
    """How many ranks a hostfile launch starts: the active hosts' slots, less the slots exclude
    names, or just the slots include names."""
    slots = read_hostfile(path)
    hosts = active_hosts(list(slots), include, exclude)
    if include:
        return sum(named_slots(include)[h] or slots[h] for h in hosts)
    return sum(slots[h] - (named_slots(exclude).get(h) or 0) for h in hosts)


def world_size(cfg) -> tuple[int, str]:
    """(ranks a launch starts, what decided it): pretrain.num_gpus, or the hostfile's slots."""
    if not cfg.hostfile:
        return cfg.num_gpus, "pretrain.num_gpus"
    return hostfile_slots(cfg.hostfile, cfg.include, cfg.exclude), f"the slots of pretrain.hostfile {cfg.hostfile}"


def check_hostfile(path: str, ssh_port: int = 22, launcher: str = "pdsh", include: str = "", exclude: str = "",
                   timeout_s: float = 5.0) -> list[str]:
    """The hosts a launch will use, each checked before training: its name resolves, its ssh
    server answers on ssh_port and, for pdsh, a non-interactive ssh login works (the key and the
    host key). Raises ConnectionError naming the host, the port and what to change."""
    hosts = active_hosts(hostfile_hosts(path), include, exclude)
    if launcher == "slurm":  # Slurm starts the ranks itself, no ssh
        return hosts
    where = f"pretrain.hostfile {path}: host {{host!r}}"
    for host in hosts:
        why = ssh_answer(host, ssh_port, timeout_s)
        if why == "refused":
            other = next((p for p in OTHER_SSH_PORTS if p != ssh_port and ssh_answer(host, p, 2.0) is None), None)
            hint = (f"ssh answers there on port {other}: set pretrain.ssh_port: {other}" if other else
                    "its ssh server is not running or listens on another port: start it, or set pretrain.ssh_port "
                    "to the port in its /etc/ssh/sshd_config")
            raise ConnectionError(f"{where.format(host=host)} refuses connections on port {ssh_port} "
                                  f"(pretrain.ssh_port); {hint}")
        if why is not None:
            raise ConnectionError(f"{where.format(host=host)} is unreachable on its ssh port {ssh_port} ({why}): it is "
                                  "down or the name is wrong; start it, fix the name, or remove it from the hostfile "
                                  f"(or leave it out with pretrain.exclude: {host})")
        if launcher in SSH_LAUNCHERS:
            check_ssh_login(host, ssh_port, where.format(host=host), timeout_s)
    return hosts


def ssh_answer(host: str, port: int, timeout_s: float) -> str | None:
    """None when an ssh server answers on host:port (its banner read), 'refused' when the host
    answers but nothing listens there, else what went wrong."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            banner = s.recv(64)
    except ConnectionRefusedError:
        return "refused"
    except socket.gaierror as e:
        return f"its name does not resolve: {e.strerror}"
    except TimeoutError:
        return f"no answer in {timeout_s:g} s"
    except OSError as e:
        return e.strerror or str(e)
    if not banner.startswith(b"SSH-"):
        return f"port {port} answers, but not as an ssh server ({banner[:20]!r}); set pretrain.ssh_port to its sshd's port"
    return None


def check_ssh_login(host: str, port: int, where: str, timeout_s: float) -> None:
    """A non-interactive ssh login, as pdsh will make it."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout_s)}", "-p", str(port), host, "true"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s * 3)
    except subprocess.TimeoutExpired:
        raise ConnectionError(f"{where}: `{' '.join(cmd)}` did not finish in {timeout_s * 3:g} s") from None
    if r.returncode:
        said = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConnectionError(
            f"{where}: ssh on port {port} does not log in without a password ({said}); from this machine run "
            f"`ssh-copy-id -p {port} {host}` and `ssh -p {port} {host} true` once to accept its host key")


def launch_command(cfg, spec_path: Path) -> list[str]:
    """The deepspeed launcher running `model.train` on one machine's processes or a hostfile's nodes;
    one process on this machine runs `model.train` itself, as the whole world (the launcher's runner
    and its per-node launch process would add two interpreters importing DeepSpeed, 5-10 s a run).
    With a hostfile, every node is checked first (check_hostfile)."""
    from model.train import free_port  # torch, but only when launching

    port = str(free_port())
    if not cfg.hostfile and cfg.num_gpus == 1:
        return [sys.executable, "-m", "model.train", "--master_port", port, str(spec_path)]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--master_port", port]
    if cfg.hostfile:
        check_hostfile(cfg.hostfile, cfg.ssh_port, cfg.launcher, cfg.include, cfg.exclude)
        cmd += ["--hostfile", cfg.hostfile, "--launcher", cfg.launcher, "--ssh_port", str(cfg.ssh_port)]
        cmd += ["--include", cfg.include] if cfg.include else []
        cmd += ["--exclude", cfg.exclude] if cfg.exclude else []
        cmd += ["--master_addr", cfg.master_addr] if cfg.master_addr else []
    else:
        cmd += ["--num_gpus", str(cfg.num_gpus)]
    return cmd + ["--module", "model.train", str(spec_path)]


def child_env(run_id: str | None, cfg, env_dir: Path | None = None) -> dict:
    """The environment of the launcher and its ranks: thread counts, compiled-op cache, the
    accelerator, forja on the import path, the MLflow run to log to (when there is one) and,
    on a CPU, an allocator that keeps freed memory (model.train.cpu_allocator_env).

    With a hostfile, the same reaches the other nodes' ranks: written to DeepSpeed's env file
    (env_dir/deepspeed_env, a fresh temporary folder without env_dir) named by DS_ENV_FILE."""
    import mlflow

    import model.train

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if run_id is not None:
        env |= {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    env.setdefault("OMP_NUM_THREADS", str(rank_threads(cfg)))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "forja" / "torch_extensions"))
    device = model.train.device_and_dtype()[0]
    env.setdefault("DS_ACCELERATOR", device)
    if device == "cpu":
        for k, v in model.train.cpu_allocator_env().items():
            env.setdefault(k, v)
    root = str(Path(__file__).resolve().parent.parent)  # the ranks import model.train from this checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if cfg.hostfile:
        env["DS_ENV_FILE"] = str(write_env_file(env, env_dir))
    return env


def remote_env(env: dict) -> dict[str, str]:
    """The variables of env the other nodes' ranks get (REMOTE_VARS, REMOTE_PREFIXES; never the
    watchdog's pid)."""
    return {k: v for k, v in sorted(env.items())
            if k in REMOTE_VARS or k.startswith(REMOTE_PREFIXES)}


def write_env_file(env: dict, folder: Path | None = None) -> Path:
    """DeepSpeed's env file for the other nodes: remote_env(env), then the lines of the user's own
    ~/.deepspeed_env and ./.deepspeed_env (which DeepSpeed reads only without DS_ENV_FILE)."""
    import tempfile

    lines = []
    for k, v in remote_env(env).items():
        if UNSAFE.search(v):
            raise ValueError(f"environment variable {k}={v!r} cannot reach the other nodes: DeepSpeed passes it "
                             "through a shell command line, where quotes, $, ` and \\ change it; set it without them")
        lines.append(f"{k}={v}")
    for own in (Path.home() / ".deepspeed_env", Path(".deepspeed_env")):
        if own.is_file():
            lines += [x for x in own.read_text().splitlines() if "=" in x]
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="forja-dsenv-"))
    path = folder.resolve() / "deepspeed_env"
    path.write_text("\n".join(lines) + "\n")
    return path


REPORTED = ("step", "model:", "resumed", "checkpoint", "samples")  # training lines worth a Prefect log entry
# A node's failure as DeepSpeed's launch (prefixed with the host by pdsh) and pdsh report it.
RANK_EXIT = re.compile(r"^(?P<host>[^\s:]+): .*exits with return code = (?P<code>-?\d+)")
SSH_EXIT = re.compile(r"^pdsh@[^:]+: (?P<host>[^\s:]+): ssh exited with exit code (?P<code>\d+)")


def failed_hosts(lines) -> dict[str, str]:
    """host -> why, the likely cause first. A rank killed by a signal (the OOM killer, a lost
    machine, kill -9) comes before ranks that exited with an error: that is how the others end
    once a peer is gone (their next collective reads "connection reset by peer"), and they may
    be reported first. Otherwise in the order the failures were reported."""
    hosts: dict[str, tuple[bool, str]] = {}
    for line in lines:
        if m := RANK_EXIT.match(line):
            code = int(m["code"])
            killed, why = code < 0, f"a rank was killed by signal {-code}" if code < 0 else f"a rank exited with {code}"
        elif m := SSH_EXIT.match(line):
            killed, why = False, f"its launcher exited with {m['code']}"
        else:
            continue
        hosts.setdefault(m["host"], (killed, why))
    ranked = sorted(hosts.items(), key=lambda kv: not kv[1][0])  # stable: report order among equals
    return {host: why for host, (_, why) in ranked}


def failure_message(code: int, tail, failures: list[str]) -> str:
    hosts = failed_hosts(failures)
    last = "; last lines:\n" + "\n".join(tail)
    if not hosts:
        return f"training process exited with {code}" + last
    (first, why), *rest = hosts.items()
    then = "; then " + ", ".join(f"{h} ({w})" for h, w in rest) if rest else ""
    return (f"training failed on host {first} ({why}){then}. Look at {first}'s lines below (out of memory? killed?), "
            "fix it and run the stage again: training resumes from the last committed checkpoint" + last)


def run_training(cmd: list[str], env: dict, max_steps: int, label: str = "pretrain") -> float:
    """Run the launcher, logging its ranks' progress; raise with the last lines if it fails (on a
    hostfile's nodes: naming the node that failed first). Returns its wall seconds (the training's
    GPU-seconds, per GPU, in its cost).

    On a terminal, a progress bar shows step, loss and tokens/s as well.

    What stops the ranks when this process goes: an exception here (timeout, cancel, Ctrl-C)
    SIGTERMs the launcher's process group. A SIGKILL runs no code here: the launcher gets the
    parent-death signal, and ranks on this machine outside ssh have their watchdog on this pid.
    Ranks started over ssh (a hostfile) have neither, and pdsh outlives a killed runner, so there
    the parent-death signal is SIGTERM: DeepSpeed's runner catches it, stops pdsh and pkills the
    per-node launchers (and so their ranks) on every node through pdsh.
    """
    import logging
    import signal

    import model.train

    started = time.monotonic()
    tail: deque[str] = deque(maxlen=30)
    failures: list[str] = []  # kept apart from the tail, which a long traceback would push them out of
    env = dict(env, **{model.train.PARENT_ENV: str(os.getpid())})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            preexec_fn=die_with_parent(signal.SIGTERM if "--hostfile" in cmd else signal.SIGKILL))
    try:
        with TrainingProgress(max_steps, label) as bar:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                if RANK_EXIT.match(line) or SSH_EXIT.match(line):
                    failures.append(line)
                if line.startswith(REPORTED):
                    logging.getLogger(f"forja.{label}").info("%s: %s", label, line)
                    bar.update(line)
    except BaseException:  # a task timeout, a cancelled run, Ctrl-C: leave no rank training behind
        stop_group(proc)
        model.train.drop_shm_buffers(master_port(cmd))
        raise
    proc.wait()
    model.train.drop_shm_buffers(master_port(cmd))
    if proc.returncode:
        raise RuntimeError(failure_message(proc.returncode, tail, failures))
    return time.monotonic() - started


def master_port(cmd: list[str]) -> int | None:
    """The --master_port of a launch command line (the launcher's, or a lone rank's)."""
    return int(cmd[cmd.index("--master_port") + 1]) if "--master_port" in cmd else None


def die_with_parent(sig: int | None = None):
    """A preexec_fn sending the child sig (default SIGKILL) when this process dies (Linux
    PR_SET_PDEATHSIG; None elsewhere). prctl is looked up here, so the child between fork and exec only calls it. The
    signal follows the thread that started the child, which waits on it until it ends."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    parent, pr_set_pdeathsig, sig = os.getpid(), 1, int(signal.SIGKILL if sig is None else sig)

    def arm() -> None:
        prctl(pr_set_pdeathsig, sig)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group of proc (the launcher and its ranks), SIGKILL what is left after
    grace_s. The last committed checkpoint stays, so a retry resumes from it."""
    import logging
    import signal

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reap the launcher, or its zombie keeps the group alive
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:  # nobody left in the group
            break
    logging.getLogger("forja.pretrain").warning("training stopped: its process group %d was terminated", proc.pid)


class TrainingProgress:
    """A rich progress bar fed by the training's `step N key=value ...` lines (terminals only)."""

    def __init__(self, total: int, label: str = "pretrain"):
        self.total, self.label, self.progress, self.task = total, label, None, None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(self.label), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, info="")
        return self

    def update(self, line: str) -> None:
        if self.progress is None or not line.startswith("step "):
            return
        parts = line.split()
        fields = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
        info = f"loss {fields.get('train_loss', '?')}  {fields.get('tokens_per_s', '?')} tok/s"
        self.progress.update(self.task, completed=int(parts[1]), info=info)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
