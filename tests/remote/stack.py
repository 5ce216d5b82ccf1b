"""A real NDIF stack on 127.0.0.1 for one model, started and stopped by PID (never by name).

Services (ndif 0.1.2 and its dependencies live in ``.venv-ndif``, see ``make test-remote``):

- Redis (Debian ``redis-server``): ndif's request queue and status pub/sub;
- moto's S3 server: the object store ndif uses for results too big for a status message;
- a Ray head (``ray start --head --block``) declaring one GPU and its memory, since ndif places
  models only on nodes with a GPU resource, and ndif's controller actor on it;
- the ndif API (FastAPI under gunicorn, with ndif's queue dispatcher);
- one replica of the model, deployed with its size given (ndif's own size estimate calls
  nnsight's ``describe_checkpoint`` with an argument nnsight 0.8.1 does not take), run by
  ``ndif_cpu_actor.CPUModelActor`` (ndif's stock actor calls CUDA).

Every service listens on 127.0.0.1 (ndif's defaults bind 0.0.0.0). ``down`` signals each
started process group, then any descendant still alive, by PID.

Usage: ``python tests/remote/stack.py up MODEL_DIR`` (prints NDIF_HOST=..., waits for Ctrl-C);
as a library: ``with Stack(model_dir) as stack: ... stack.host``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
# Fixed, uncommon ports (override with NDIF_TEST_PORT_BASE): Redis, S3, Ray GCS, Ray client, API.
BASE = int(os.environ.get("NDIF_TEST_PORT_BASE", "27300"))
PORTS = {"redis": BASE, "s3": BASE + 1, "ray": BASE + 2, "ray_client": BASE + 3, "api": BASE + 4,
         "node_manager": BASE + 5, "object_manager": BASE + 6, "metrics": BASE + 7,
         "agent_grpc": BASE + 8, "agent_listen": BASE + 9, "runtime_env": BASE + 10, "dashboard": BASE + 11}
WORKER_PORTS = (BASE + 20, BASE + 120)  # Ray's worker processes (its default range is 10002-19999)
GPU_MEMORY = 4 * 2**30  # what the CPU node declares as its one "GPU"'s memory (the model's budget)


class StackError(RuntimeError):
    pass


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) != 0


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if not _free(port):
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode} before listening on {port}")
        time.sleep(0.3)
    raise StackError(f"{what} did not listen on {HOST}:{port} within {timeout:.0f} s")


def _children() -> dict[int, list[int]]:
    """PID -> child PIDs, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pids: list[int]) -> list[int]:
    """The PIDs given and every process below them."""
    kids, out, todo = _children(), [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes and their descendants (/proc/PID/status VmRSS)."""
    total = 0
    for pid in set(descendants(pids)):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def model_size_bytes(model_dir: str | Path) -> int:
    """The weights' bytes on disk (what the deployment is sized by)."""
    files = list(Path(model_dir).glob("*.safetensors")) + list(Path(model_dir).glob("*.bin"))
    if not files:
        raise StackError(f"no weights (*.safetensors, *.bin) in {model_dir}")
    return sum(f.stat().st_size for f in files)


class Stack:
    """The services above for ``model_dir``, under ``workdir`` (logs, Ray's temp files)."""

    def __init__(self, model_dir: str | Path, venv: str | Path | None = None,
                 workdir: str | Path | None = None) -> None:
        self.model_dir = str(Path(model_dir).resolve())
        self.venv = Path(venv or os.environ.get("NDIF_VENV", ROOT / ".venv-ndif"))
        given = workdir or os.environ.get("NDIF_TEST_WORKDIR")
        self.workdir = Path(given or f"/tmp/ndif-test-{os.getpid()}")
        self.remove_workdir = not given  # a stack that came up and went down leaves nothing behind
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.host = f"http://{HOST}:{PORTS['api']}"
        self.model_key: str | None = None

    # ------------------------------------------------------------------ helpers
    def bin(self, name: str) -> str:
        path = self.venv / "bin" / name
        if not path.exists():
            raise StackError(f"{path} is missing: run `make test-remote` (it builds {self.venv})")
        return str(path)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(key, None)
        env.update({
            "PATH": f"{self.venv / 'bin'}:{env.get('PATH', '')}",
            "PYTHONPATH": f"{HERE}:{ROOT}",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "GRPC_ENABLE_FORK_SUPPORT": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "NDIF_HOME": str(self.workdir / "home"),
            "NDIF_REDIS_URL": f"redis://{HOST}:{PORTS['redis']}",
            "NDIF_OBJECT_STORE_URL": f"http://{HOST}:{PORTS['s3']}",
            "NDIF_OBJECT_STORE_ACCESS_KEY": "testing", "NDIF_OBJECT_STORE_SECRET_KEY": "testing",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "NDIF_RAY_ADDRESS": f"ray://{HOST}:{PORTS['ray_client']}",
            "NDIF_API_PORT": str(PORTS["api"]), "NDIF_API_URL": self.host,
            "NDIF_MODEL_IMPORT_PATH": "ndif_cpu_actor.CPUModelActor",
            "NDIF_DEFAULT_DTYPE": "float32",
            "NDIF_CONTROLLER_SYNC_INTERVAL_S": "2",
        })
        return env

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                cwd=self.workdir, start_new_session=True)  # its own process group
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, n: int = 15) -> str:
        try:
            return "\n".join((self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---------------------------------------------------------------- lifecycle
    def up(self, timeout: float = 300) -> Stack:
        busy = [f"{k}={p}" for k, p in PORTS.items() if not _free(p)]
        if busy:
            raise StackError(f"ports in use on {HOST}: {', '.join(busy)} (set NDIF_TEST_PORT_BASE)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "home").mkdir(exist_ok=True)
        try:
            self._up(timeout)
        except StackError as e:
            self.down()
            raise StackError(f"{e} (logs in {self.workdir})") from None
        except BaseException:
            self.down()
            raise
        return self

    def _up(self, timeout: float) -> None:
        redis = self.start("redis", ["redis-server", "--bind", HOST, "--port", str(PORTS["redis"]),
                                     "--save", "", "--appendonly", "no", "--protected-mode", "yes"])
        s3 = self.start("s3", [self.bin("moto_server"), "-H", HOST, "-p", str(PORTS["s3"])])
        _wait_port(PORTS["redis"], 30, redis, "redis-server")
        _wait_port(PORTS["s3"], 60, s3, "moto_server")
        resources = {"head": 10, "cuda_memory_bytes": GPU_MEMORY, "cpu_memory_bytes": 8 * 2**30}
        ray = self.start("ray", [
            self.bin("ray"), "start", "--head", "--block", f"--node-ip-address={HOST}",
            f"--port={PORTS['ray']}", f"--ray-client-server-port={PORTS['ray_client']}",
            f"--node-manager-port={PORTS['node_manager']}", f"--object-manager-port={PORTS['object_manager']}",
            f"--metrics-export-port={PORTS['metrics']}",
            f"--dashboard-agent-grpc-port={PORTS['agent_grpc']}",
            f"--dashboard-agent-listen-port={PORTS['agent_listen']}",
            f"--runtime-env-agent-port={PORTS['runtime_env']}",
            f"--min-worker-port={WORKER_PORTS[0]}", f"--max-worker-port={WORKER_PORTS[1]}",
            # ndif's controller lists the nodes through Ray's state API, which the dashboard serves.
            "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={PORTS['dashboard']}",
            "--num-cpus=4", "--num-gpus=1",
            f"--object-store-memory={200 * 2**20}", f"--resources={json.dumps(resources)}",
            f"--temp-dir={self.workdir / 'ray'}"])
        _wait_port(PORTS["ray_client"], 120, ray, "ray head")
        controller = self.start("controller", [self.bin("python"), "-m",
                                               "ndif.services.ray.deployments.controller.controller"])
        self._wait_exit(controller, 120, "the controller launcher")
        api = self.start("api", [self.bin("gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
                                 "--bind", f"{HOST}:{PORTS['api']}", "ndif.services.api.app:app"])
        _wait_port(PORTS["api"], 120, api, "the ndif API")
        self.deploy(timeout)

    def _wait_exit(self, proc: subprocess.Popen, timeout: float, what: str) -> None:
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise StackError(f"{what} did not finish within {timeout:.0f} s") from None
        if rc != 0:
            raise StackError(f"{what} failed ({rc}): {self.log_tail('controller')}")

    def deploy(self, timeout: float) -> None:
        """Deploy the model (size given) and wait for its replica to answer."""
        proc = self.start("deploy", [self.bin("python"), str(Path(__file__).resolve()), "_deploy",
                                     self.model_dir, str(model_size_bytes(self.model_dir)), str(timeout)])
        try:
            rc = proc.wait(timeout + 60)
        except subprocess.TimeoutExpired:
            raise StackError(f"deploying did not finish within {timeout:.0f} s") from None
        if rc != 0:
            raise StackError(f"deploying the model failed: {self.log_tail('deploy')}")
        self.model_key = (self.workdir / "model_key").read_text()

    def pids(self) -> list[int]:
        return [p.pid for _, p in self.procs if p.poll() is None]

    def rss(self) -> int:
        """Resident memory of every process the stack started (and theirs)."""
        return rss_bytes(self.pids())

    def down(self) -> None:
        """SIGTERM each started process group (last first) and every descendant, then SIGKILL
        what is left after 15 s. Only PIDs this stack started (or their children)."""
        tree = descendants(self.pids())
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.time() + 15
        while time.time() < end and any(_alive(pid) for pid in tree):
            time.sleep(0.3)
        for pid in tree:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _, proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def __enter__(self) -> Stack:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)  # logs and Ray's session files


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _deploy(model_dir: str, size_bytes: int, timeout: float) -> None:
    """Run with .venv-ndif's Python: deploy the model under the key the explorer's client mints,
    then wait until a trace through the API answers."""
    import warnings

    import torch
    from ndif.cli.lib.deploy import deploy
    from nnsight.modeling import huggingface
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    huggingface._ID_CACHE.setdefault(model_dir, model_dir)  # a local path: never ask the hub
    tok = AutoTokenizer.from_pretrained(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = TransformersModel(model_dir, tokenizer=tok, task="text-generation", dispatch=False,
                               dtype=torch.float32)
    key = lm.to_model_key()
    result = deploy([{"checkpoint": model_dir, "model_key": key, "size_bytes": size_bytes, "dtype": "float32",
                      "actor_class": "ndif_cpu_actor.CPUModelActor", "trusted": True, "pinned": True}],
                    on_message=lambda m: print(m, flush=True))
    print(json.dumps(result, default=str), flush=True)
    if any(d.get("error") for d in result.get("deployments", [])):
        raise SystemExit(1)
    host = os.environ["NDIF_API_URL"]
    ids = torch.tensor([[tok.bos_token_id or 0]])
    end, last = time.time() + timeout, None
    while time.time() < end:
        try:
            with lm.trace(ids, remote=host):
                out = lm.lm_head.output.save()
            print(f"replica answered: logits {tuple(out.shape)}", flush=True)
            Path("model_key").write_text(key)
            return
        except Exception as e:  # not placed or still loading
            last = e
            time.sleep(3)
    print(f"no answer within {timeout:.0f} s: {last!r}", flush=True)
    raise SystemExit(1)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_deploy"]:
        _deploy(argv[1], int(argv[2]), float(argv[3]))
        return 0
    if argv[:1] != ["up"] or len(argv) > 2:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    if len(argv) == 2:
        model_dir = argv[1]
    else:
        sys.path.insert(0, str(ROOT))
        from explorer.core.defaults import ensure_default_model

        model_dir = str(ensure_default_model())
    stack = Stack(model_dir)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background (SIGINT ignored there)
    try:
        stack.up()
        print(f"NDIF_HOST={stack.host}  (model {stack.model_key}; stack RSS {stack.rss() / 2**30:.2f} GiB)",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
