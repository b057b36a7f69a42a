"""Shared fixtures: configs on free ports, an in-process Nidaan server, the model repository, and a
test PKI (openssl) for DICOM and gRPC TLS.

Also the ``peers`` marker, set here by itself: a test is marked when it, one of its fixtures, or
a helper in tests/ they call (followed through the code) starts another process: a peer program
found by ``need()`` (Orthanc, dcmtk, dicom3tools, openssl), ``nidaan serve``, tritonserver, or
anything through ``subprocess`` (locust, the CUDA simulator, the CLI). ``pytest -m "not peers"``
is the fast selection of unit tests. A test that starts a process without being marked (one the
code walk missed) fails, saying so, so a new peer test cannot slip into the fast selection.
"""

from __future__ import annotations

import dis
import inspect
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nidaan.core.config import Config, Peer, load_config  # noqa: E402

import peers  # noqa: E402
from peers import need  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def make_config(
    tmp_path: Path,
    *,
    peers: list[Peer] | None = None,
    destinations: list[str] | None = None,
    idle_timeout_s: float = 2.0,
    retry_initial_s: float = 0.2,
    retry_max_s: float = 1.0,
    receivers: int = 0,
) -> Config:
    """A config on an ephemeral DICOM port, with its own data dir.

    ``receivers`` 0 receives in the test's own process (quick to start, and a test may look
    inside); tests of the receiver processes, and every ``nidaan serve`` a test starts (on the
    default, ``auto``), receive in processes of their own.
    """
    cfg = load_config(None, environ={})
    cfg.dicom.receivers = receivers
    cfg.dicom.port = 0
    cfg.dicom.bind = "127.0.0.1"
    cfg.dicom.study_idle_timeout_s = idle_timeout_s
    cfg.dicom.network_timeout_s = 5.0
    cfg.grpc.port = 0
    cfg.grpc.bind = "127.0.0.1"
    cfg.storage.data_dir = tmp_path / "data"
    cfg.models.repository = MODELS
    cfg.peers = list(peers or [])
    if destinations is not None:
        cfg.reports.destinations = destinations
    cfg.reports.retry_initial_s = retry_initial_s
    cfg.reports.retry_max_s = retry_max_s
    cfg.validate()
    return cfg


@pytest.fixture
def start_server():  # type: ignore[no-untyped-def]
    """Start in-process servers with ``start_server(config)``; all are stopped at the end."""
    from nidaan.server.app import NidaanServer

    servers: list[NidaanServer] = []

    def _start(config: Config) -> NidaanServer:
        server = NidaanServer(config)
        server.start(http=False)
        servers.append(server)
        return server

    yield _start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def repository() -> Iterator[list]:
    from nidaan.server.model_repository import load_repository

    yield load_repository(MODELS)


def _openssl(*args: str, cwd: Path) -> None:
    run = subprocess.run([need("openssl"), *args], cwd=cwd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _self_signed(name: str, subject: str, cwd: Path) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", subject),
        cwd=cwd,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a certificate for Nidaan and one for the peer (127.0.0.1), and a stranger's."""
    d = tmp_path_factory.mktemp("pki")
    _self_signed("ca", "/CN=Nidaan test CA", d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("nidaan", "peer"):
        _openssl(
            *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key"),
            *("-out", f"{name}.csr", "-subj", f"/CN={name}"),
            cwd=d,
        )
        _openssl(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext"),
            cwd=d,
        )
    _self_signed("stranger", "/CN=stranger", d)
    return d


# --- the peers marker ----------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent

#: What starts another process. Anything in tests/ that reaches one of these is a peer test.
PROCESS_STARTERS: tuple[object, ...] = (
    subprocess,
    peers.need,
    peers.start_orthanc,
    peers.start_nidaan,
    peers.start_triton,
    peers.StoreSCP,
)


def _in_tests(obj: object) -> bool:
    """Whether ``obj`` is defined in a file under tests/ (only those are followed)."""
    try:
        source = inspect.getsourcefile(obj)  # type: ignore[arg-type]
    except (TypeError, OSError, ValueError):  # built-in, C extension, or no file
        return False
    return source is not None and Path(source).resolve().is_relative_to(HERE)


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)  # nested functions, lambdas, comprehensions


def _starts_processes(obj: object, seen: set[int]) -> bool:
    """Whether ``obj`` (a function, class or module) is or reaches a process starter."""
    if any(obj is starter for starter in PROCESS_STARTERS):
        return True
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    obj = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)  # @given
    obj = inspect.unwrap(obj) if callable(obj) else obj  # type: ignore[arg-type]
    if isinstance(obj, type):
        if any(base in PROCESS_STARTERS for base in obj.__mro__):
            return True
        return _in_tests(obj) and any(
            _starts_processes(member, seen)
            for member in vars(obj).values()
            if inspect.isfunction(member) or isinstance(member, (staticmethod, classmethod))
        )
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if not inspect.isfunction(obj) or not _in_tests(obj):
        return False
    namespace = obj.__globals__
    for code in _code_objects(obj.__code__):
        instructions = list(dis.get_instructions(code))
        attributes = {i.argval for i in instructions if i.opname in ("LOAD_ATTR", "LOAD_METHOD")}
        for ins in instructions:
            if ins.opname not in ("LOAD_GLOBAL", "LOAD_NAME") or ins.argval not in namespace:
                continue
            target = namespace[ins.argval]
            if isinstance(target, types.ModuleType) and target is not subprocess:
                # ``peers.need(...)``: follow the module's attributes this code uses.
                if _in_tests(target) and any(
                    _starts_processes(getattr(target, a), seen)
                    for a in attributes
                    if isinstance(a, str) and hasattr(target, a)
                ):
                    return True
            elif _starts_processes(target, seen):
                return True
    return False


def _is_peer_test(item: pytest.Item) -> bool:
    functions = [getattr(item, "obj", None)]
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        for name in item.fixturenames:  # type: ignore[attr-defined]
            functions.extend(d.func for d in info.name2fixturedefs.get(name, ()))
    return any(f is not None and _starts_processes(f, set()) for f in functions)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("peers") is None and _is_peer_test(item):
            item.add_marker(pytest.mark.peers)


#: The unmarked test running now (set up, called, torn down): it must not start a process.
_unmarked: list[str] = []
#: Audit events (PEP 578) that start a process.
_SPAWN_EVENTS = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.spawn"}


def _refuse_processes_in_unmarked_tests(event: str, args: tuple) -> None:
    if _unmarked and event in _SPAWN_EVENTS:
        raise RuntimeError(
            f"{_unmarked[0]} starts a process ({event}: {str(args[:2])[:200]}) but is not "
            "marked 'peers'; tests/conftest.py marks tests that reach subprocess, need() or "
            "peers.start_* through tests/ code; mark this one with @pytest.mark.peers"
        )


sys.addaudithook(_refuse_processes_in_unmarked_tests)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    unmarked = item.get_closest_marker("peers") is None
    if unmarked:
        _unmarked.append(item.nodeid)
    try:
        return (yield)
    finally:
        if unmarked:
            _unmarked.clear()
