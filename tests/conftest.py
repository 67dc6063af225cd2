"""Shared helpers: DESIGN.md's error measure, tolerances and randomised BN statistics."""

import pytest
import torch

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (DESIGN.md, correctness rules)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model: torch.nn.Module, generator_seed: int = 0) -> torch.nn.Module:
    """Randomised BN statistics as DESIGN.md defines them, and every zero- or constant-initialised parameter
    (identity-based 1x1s, the prior branch's 0.0 scale) perturbed so that each branch contributes."""
    g = torch.Generator().manual_seed(generator_seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                uniform(m.running_mean, -0.1, 0.1)
                uniform(m.running_var, 0.5, 1.5)
                uniform(m.weight, 0.5, 1.5)
                uniform(m.bias, -0.1, 0.1)
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("scale"):
                uniform(p, 0.1, 1.0)
            elif name.rsplit(".", 1)[-1] in ("scale_conv", "scale_1x1", "scale_identity"):  # RepOpt's CSLA / HS
                uniform(p, -1.0, 1.5)
            elif name.endswith("first") and not p.abs().sum():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request):
    return request.param


# -- real servers, started by the tests ----------------------------------------------------------------------------
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throw-away PostgreSQL server on 127.0.0.1 (initdb/pg_ctl refuse root: run them as postgres). The data
    folder is not under pytest's tmp_path (its root is 0700) but a chown'd mkdtemp."""

    def __init__(self):
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not candidates:
            pytest.fail("PostgreSQL server binaries not found: .ci/run installs Debian's postgresql package "
                        "(apt-get install -y postgresql)")
        self.bindir = candidates[-1].parent
        self.datadir = tempfile.mkdtemp(prefix="repbench-pg-")
        shutil.chown(self.datadir, "postgres", "postgres")
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(self.run_as + [str(self.bindir / "initdb"), "-D", self.datadir, "-A", "trust", "-U",
                                      "postgres"], check=True, capture_output=True)
        self.port = free_port()
        self.start()

    def url(self, password: str | None = None) -> str:
        user = "postgres" + (f":{password}" if password else "")
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args):
        return subprocess.run(self.run_as + [str(self.bindir / "pg_ctl"), "-D", self.datadir, *args],
                              capture_output=True)

    def start(self):
        done = self._ctl("-l", f"{self.datadir}/log", "-w", "-o",
                         f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1", "start")
        assert done.returncode == 0, done.stderr

    def stop(self, mode: str = "fast"):
        self._ctl("-m", mode, "-w", "stop")

    def remove(self):
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = Postgres()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    return postgres_server.url()


def fresh_postgres_url(server: Postgres) -> str:
    """A new, empty database on the session's server (tests that need their own)."""
    import uuid
    name = f"t{uuid.uuid4().hex[:12]}"
    subprocess.run(server.run_as + [str(server.bindir / "psql"), "-h", server.datadir, "-p", str(server.port), "-U",
                                    "postgres", "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
    return server.url().rsplit("/", 1)[0] + f"/{name}"


SLURM_LIB = Path("/usr/lib/x86_64-linux-gnu/slurm-wlm")


class Slurm:
    """A real single-node Slurm (Debian's slurm-wlm 22.05 and munge, installed by .ci/run): munged, slurmctld and
    slurmd as root with a private slurm.conf, private ports and paths (ecosystem notes §4.3). Clients (sbatch,
    squeue, scontrol, srun) find it through $SLURM_CONF. Stopped by pid."""

    def __init__(self):
        if "/usr/sbin" not in os.environ["PATH"].split(":"):  # the daemons live there; a user's PATH may lack it
            os.environ["PATH"] += ":/usr/sbin"
        for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                pytest.fail(f"{tool} not found: .ci/run installs Debian's slurm-wlm and munge "
                            "(apt-get install -y slurm-wlm munge)")
        self.dir = Path(tempfile.mkdtemp(prefix="repbench-slurm-"))
        for sub in ("etc", "run", "log", "state", "spool"):
            (self.dir / sub).mkdir()
        d = self.dir
        subprocess.run(["mungekey", "--create", f"--keyfile={d}/etc/munge.key"], check=True, capture_output=True)
        os.chmod(d / "etc/munge.key", 0o600)
        subprocess.run(["munged", "--force", f"--socket={d}/run/munge.sock", f"--key-file={d}/etc/munge.key",
                        f"--pid-file={d}/run/munged.pid", f"--log-file={d}/log/munged.log",
                        f"--seed-file={d}/state/munged.seed"], check=True, capture_output=True)
        cpus = os.cpu_count() or 2
        (d / "etc/slurm.conf").write_text(f"""ClusterName=repbench
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/run/munge.sock
PluginDir={SLURM_LIB}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=20
NodeName=localhost CPUs={cpus} RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self.conf = str(d / "etc/slurm.conf")
        os.environ["SLURM_CONF"] = self.conf
        subprocess.run(["slurmctld", "-f", self.conf], check=True, capture_output=True)
        subprocess.run(["slurmd", "-f", self.conf, "-N", "localhost"], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"the test Slurm did not come up (sinfo: {out!r}); logs in {d}/log")

    def jobs(self) -> list[str]:
        return subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True).stdout.split("\n")

    def stop(self):
        subprocess.run(["scancel", "--full", "--user=root"], capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.dir / "run" / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        os.environ.pop("SLURM_CONF", None)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm():
    cluster = Slurm()
    try:
        yield cluster
    finally:
        cluster.stop()
