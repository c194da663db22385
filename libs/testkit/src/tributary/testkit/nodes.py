"""Private RabbitMQ and PostgreSQL servers for fault tests, beside the machine's own.

Fault tests stop, kill and starve servers; doing that to the shared broker or database would
break every other test running at the same time. These nodes have their own name, ports,
directories and (for RabbitMQ) Erlang cookie, so nothing here can reach the system servers.
Linux only: processes are found through ``/proc``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tributary.testkit.processes import free_port

RABBIT_SBIN_GLOB = "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
EPMD_GLOB = "/usr/lib/erlang/erts-*/bin/epmd"

T = TypeVar("T")
DEFAULT_MEMORY_WATERMARK = 0.4


class NodeUnavailable(RuntimeError):
    """The server software for a private node is not installed here."""


def rabbit_sbin() -> Path:
    """The RabbitMQ server's own script directory (not the ``/usr/sbin`` wrappers, which
    switch to the ``rabbitmq`` user and so to the system node's cookie)."""
    found = sorted(glob.glob(RABBIT_SBIN_GLOB))
    if not found or not Path(found[-1], "rabbitmq-server").exists():
        raise NodeUnavailable(f"rabbitmq-server not installed (nothing at {RABBIT_SBIN_GLOB})")
    return Path(found[-1])


def postgres_bin() -> Path:
    """The newest installed PostgreSQL server's bin directory."""
    found = sorted(glob.glob(POSTGRES_BIN_GLOB), key=lambda p: _version_key(Path(p).parent.name))
    if not found or not Path(found[-1], "initdb").exists():
        raise NodeUnavailable(f"PostgreSQL server not installed (no initdb in {POSTGRES_BIN_GLOB})")
    return Path(found[-1])


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is as good as gone


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pids_mentioning(needle: str) -> list[int]:
    """Processes whose command line mentions ``needle`` (a path or name unique to one node)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def _kill_all(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def _wait(check: Callable[[], object], what: str, timeout: float, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


class RabbitNode:
    """A private RabbitMQ node beside the system one (own name, ports, cookie and dirs)."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        name: str | None = None,
        cookie: str | None = None,
        config: str = "",
        advanced: str = "",
    ) -> None:
        """``name``, ``cookie``, ``config`` (extra ``rabbitmq.conf`` lines) and ``advanced``
        (extra ``rabbit`` application settings) let several nodes form a cluster."""
        self.sbin = rabbit_sbin()
        token = uuid.uuid4().hex[:8]
        self.port = port or free_port()
        self.dist_port = free_port()
        self.name = name or f"rabbit-t{token}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.base = Path(workdir) / f"rabbit-{token}"
        self.pid_file = self.base / "rabbit.pid"
        self.log_dir = self.base / "log"
        self._cookie = cookie or uuid.uuid4().hex.upper()
        self._config = config
        self._advanced = advanced
        self._env = self._environment()

    def _environment(self) -> dict[str, str]:
        # Nothing inherited may point the node or the CLI at the system node.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        base = self.base
        env.update(
            HOME=str(base / "home"),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            # no busy-waiting schedulers: several VMs share few cores with the tests
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _write_files(self) -> None:
        home = self.base / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self._cookie)
            cookie.chmod(0o400)
        (self.base / "rabbitmq-env.conf").write_text(
            "ERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        # Without an explicit config the default listener would claim 5672.
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            # Queue counts (``queues()``) refresh at this interval; the default is 5 s.
            "collect_statistics_interval = 500\n"
            "log.console = false\n"
            "log.file.level = info\n" + self._config
        )
        # Quorum queues report their counts on this tick (default 5 s); no schema key for it.
        (self.base / "advanced.config").write_text(
            f"[{{rabbit, [{{quorum_tick_interval, 500}}{self._advanced}]}}].\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")

    def start(self, timeout: float = 120) -> None:
        """Boot the node; returns when it accepts AMQP connections."""
        self.launch()
        self.wait_started(timeout)

    def launch(self) -> None:
        """Start booting the node in the background (``rabbitmq-server -detached``)."""
        self._write_files()
        self.pid_file.unlink(missing_ok=True)  # a killed node's, stale
        subprocess.run(
            [str(self.sbin / "rabbitmq-server"), "-detached"],
            env=self._env,
            cwd=self.base,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def wait_started(self, timeout: float = 120) -> None:
        """Returns when a launched node accepts AMQP connections and has finished booting."""
        deadline = time.monotonic() + timeout
        _wait(self._serving, f"{self.name} serving AMQP on {self.port}", timeout)
        self._await_ready(max(1.0, deadline - time.monotonic()))

    def _serving(self) -> bool:
        """True once AMQP is served; raises if the node died before that."""
        if _port_open(self.port):
            return True
        if not pids_mentioning(str(self.base)):
            time.sleep(1)  # the detached VM may not have exec'd yet
            if not pids_mentioning(str(self.base)) and not _port_open(self.port):
                raise RuntimeError(f"{self.name} exited while booting:\n{self.log_tail()}")
        return False

    def pids(self) -> list[int]:
        """The node's VM and every process it started."""
        pids = pids_mentioning(str(self.base))
        return sorted(set(pids + [child for pid in pids for child in _children(pid)]))

    def kill(self) -> None:
        """SIGKILL the node, as a crash would; its data stays, so :meth:`restart` brings it
        back as the same cluster member."""
        _kill_all(self.pids())

    def pause(self) -> None:
        """SIGSTOP the node: it holds its connections and answers nothing (a hung machine)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused node."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def restart(self, timeout: float = 120) -> None:
        """Kill the node if it runs, then boot it again on the same data."""
        self.kill()
        self.start(timeout)

    def _await_ready(self, timeout: float) -> None:
        _wait(lambda: _port_open(self.port), f"AMQP on {self.port}", timeout)
        self.ctl("await_startup", "--timeout", str(max(1, int(timeout))))

    @property
    def ctl_env(self) -> dict[str, str]:
        """The environment ``rabbitmqctl`` needs to reach this node (its cookie and config)."""
        return dict(self._env)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> <args>``."""
        result = subprocess.run(
            [str(self.sbin / "rabbitmqctl"), "-n", self.name, *args],
            env=self._env,
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Start the RabbitMQ application again; returns when AMQP is served."""
        self.ctl("start_app")
        self._await_ready(120)

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "closed by test")

    def set_memory_watermark(self, fraction: float) -> None:
        # Plain decimal notation, never Python's "1e-06".
        text = f"{fraction:.12f}".rstrip("0")
        self.ctl("set_vm_memory_high_watermark", text + ("0" if text.endswith(".") else ""))

    def reset_memory_watermark(self) -> None:
        self.set_memory_watermark(DEFAULT_MEMORY_WATERMARK)

    def queues(self) -> dict[str, dict[str, int]]:
        """Queue name -> messages, messages_ready, messages_unacknowledged, consumers."""
        fields = ["messages", "messages_ready", "messages_unacknowledged", "consumers"]
        result = self.ctl("list_queues", "-q", "--formatter", "json", "name", *fields)
        rows = json.loads(result.stdout or "[]")
        return {row["name"]: {f: _as_int(row.get(f)) for f in fields} for row in rows}

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for log in sorted(self.log_dir.glob("*.log")):
            text += log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)

    def stop(self) -> None:
        """Kill the node and every process it started, then remove its directories.

        Idempotent and quiet, so it is safe in ``finally`` blocks and teardown.
        """
        # The VM names its home (in this node's directory) on its command line, so this finds it
        # with or without a pid file, and never a recycled pid.
        self.kill()
        # Keep the node's log beside the test's other files for a post-mortem.
        for log in self.log_dir.glob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(log, self.base.parent / f"{self.base.name}-{log.name}")
        shutil.rmtree(self.base, ignore_errors=True)


class RabbitCluster:
    """Three private RabbitMQ nodes clustered with ``classic_config`` peer discovery.

    They share a cookie of their own and a cluster name; each has its own node name, ports and
    directories. Quorum queues declared on it get a replica on every node.
    """

    LETTERS = "abc"

    def __init__(self, workdir: Path) -> None:
        token = uuid.uuid4().hex[:8]
        self.cluster_name = f"tributary-{token}"
        cookie = uuid.uuid4().hex.upper()
        names = [f"rabbit-{token}-{letter}@localhost" for letter in self.LETTERS]
        config = (
            f"cluster_name = {self.cluster_name}\n"
            "cluster_formation.peer_discovery_backend = classic_config\n"
            + "".join(
                f"cluster_formation.classic_config.nodes.{n} = {name}\n"
                for n, name in enumerate(names, 1)
            )
            + "cluster_formation.discovery_retry_limit = 1\n"
            "cluster_formation.discovery_retry_interval = 200\n"
        )
        self.nodes = [
            RabbitNode(
                Path(workdir),
                name=name,
                cookie=cookie,
                config=config,
                # every quorum queue on all three (3.10's default, said out loud)
                advanced=", {quorum_cluster_size, 3}",
            )
            for name in names
        ]

    @property
    def urls(self) -> list[str]:
        """One AMQP URL per node, in node order."""
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 120) -> None:
        """Boot the three nodes side by side; returns when each sees the other two running."""
        try:
            for node in self.nodes:
                node.launch()
            # the CLI takes seconds to start on a busy machine: ask the three at once
            self._each(lambda node: node.wait_started(timeout))
            self.wait_clustered(timeout)
        except BaseException:
            self.stop()
            raise

    def _each(self, action: Callable[[RabbitNode], T]) -> list[T]:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            return list(pool.map(action, self.nodes))

    def running_nodes(self, node: RabbitNode) -> set[str]:
        """The cluster members ``node`` reports as running (empty if it does not answer)."""
        result = node.ctl("cluster_status", "--formatter", "json", check=False)
        if result.returncode != 0:
            return set()
        try:
            return set(json.loads(result.stdout).get("running_nodes", []))
        except ValueError:
            return set()

    def clustered(self) -> bool:
        """Whether every node reports all three running."""
        everyone = {node.name for node in self.nodes}
        return all(running == everyone for running in self._each(self.running_nodes))

    def wait_clustered(self, timeout: float = 120) -> None:
        _wait(self.clustered, f"cluster {self.cluster_name} of three running nodes", timeout, 0.5)

    def node(self, name: str) -> RabbitNode:
        """The node called ``name`` (``rabbit-…-a@localhost``)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def quorum_queue(self, queue: str, via: RabbitNode | None = None) -> dict[str, Any]:
        """``name``, ``leader``, ``members`` and ``online`` of a quorum queue, as a node sees it."""
        for node in [via] if via is not None else self.nodes:
            result = node.ctl(
                "list_queues", "-q", "--formatter", "json",
                "name", "leader", "members", "online", check=False,
            )  # fmt: skip
            if result.returncode != 0:
                continue
            for row in json.loads(result.stdout or "[]"):
                if row.get("name") == queue:
                    return dict(row)
            raise KeyError(queue)
        raise RuntimeError(f"no node of {self.cluster_name} answers")

    def leader(self, queue: str) -> RabbitNode:
        """The node leading quorum queue ``queue`` (asked of the first node that answers)."""
        return self.node(str(self.quorum_queue(queue)["leader"]))

    def kill(self, node: RabbitNode) -> None:
        node.kill()

    def pause(self, node: RabbitNode) -> None:
        node.pause()

    def resume(self, node: RabbitNode) -> None:
        node.resume()

    def restart(self, node: RabbitNode, timeout: float = 120) -> None:
        """Kill ``node`` if it runs, boot it on its data; returns when it is back in the
        cluster."""
        node.restart(timeout)
        self.wait_clustered(timeout)

    def registered_in_epmd(self) -> list[str]:
        """This cluster's node names still registered in epmd."""
        epmd = shutil.which("epmd") or next(iter(sorted(glob.glob(EPMD_GLOB))), None)
        if epmd is None:
            return []
        result = subprocess.run(
            [epmd, "-names"], capture_output=True, text=True, timeout=10, check=False
        )
        short = {node.name.split("@")[0] for node in self.nodes}
        return [
            parts[1]
            for line in result.stdout.splitlines()
            if len(parts := line.split()) > 1 and parts[0] == "name" and parts[1] in short
        ]

    def stop(self) -> None:
        """Kill every node (paused ones too) and remove their directories. Idempotent."""
        for node in self.nodes:
            node.resume()
        for node in self.nodes:
            node.stop()


def _as_int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return 0  # e.g. "" while a quorum queue has no leader


class PostgresNode:
    """A private PostgreSQL cluster (initdb as user ``postgres``) on its own port."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.bin = postgres_bin()
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        # Outside ``workdir``: pytest's tmp dirs are root-only, and socket paths must be short.
        self.base = Path(tempfile.mkdtemp(prefix="tributary-pg-"))
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
        self.data = self.base / "data"
        self.log_file = self.base / "postgres.log"
        self._initialised = False
        self._destroyed = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a server program, as the ``postgres`` user when we are root (it refuses root)."""
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        result = subprocess.run(
            [*prefix, *args],
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{self.log_tail()}"
            )
        return result

    def _initdb(self) -> None:
        initdb = str(self.bin / "initdb")
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# private test node\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\n"
                # fsync off: fast, and a killed server is a process crash, the OS keeps what
                # was written; synchronous_commit stays on, so a SIGKILL loses no commit the
                # server acknowledged (as in production)
                "fsync = off\n"
                "full_page_writes = off\n"
                "max_connections = 100\n"
            )
        self._initialised = True

    def start(self, timeout: float = 60) -> None:
        """Start the server (creating the cluster the first time); returns when it accepts."""
        if self._destroyed:
            raise RuntimeError("PostgresNode was destroyed")
        if not self._initialised:
            self._initdb()
        if self.postmaster_pid() is not None:
            return
        pg_ctl = str(self.bin / "pg_ctl")
        self._run(
            pg_ctl, "start", "-D", str(self.data), "-l", str(self.log_file),
            "-w", "-t", str(int(timeout)), timeout=timeout + 10,
        )  # fmt: skip
        _wait(lambda: _port_open(self.port), f"PostgreSQL on {self.port}", timeout)

    def postmaster_pid(self) -> int | None:
        pid = _read_pid(self.data / "postmaster.pid")
        return pid if pid is not None and _pid_alive(pid) else None

    def stop(self) -> None:
        """Fast shutdown (clients disconnected, no crash recovery on the next start)."""
        if self.postmaster_pid() is not None:
            self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would (its backends go too, so it can restart)."""
        pid = self.postmaster_pid()
        if pid is not None:
            _kill_all([pid, *_children(pid)])
            # Until init reaps it, the dead postmaster is a zombie that still "owns" the data
            # and socket lock files, and the next start would refuse; nothing holds them now.
            (self.data / "postmaster.pid").unlink(missing_ok=True)
            (self.base / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
            (self.base / f".s.PGSQL.{self.port}").unlink(missing_ok=True)

    def destroy(self) -> None:
        """Stop the server and remove the cluster; the log is kept in ``workdir``."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            self.stop()
        except Exception:
            self.kill()
        pids = pids_mentioning(str(self.data))
        _kill_all([*pids, *(c for p in pids for c in _children(p))])
        with contextlib.suppress(OSError):
            self.workdir.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.log_file, self.workdir / f"postgres-{self.port}.log")
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def create_database(self, name: str) -> str:
        """Create database ``name``; returns its SQLAlchemy URL."""
        from tributary.testkit.infra import create_postgres_database

        return await create_postgres_database(self.url, name)
