"""``kernels.cache_dir``: the ``nidaan`` command caches the compiled kernels there, and
``configure_cache`` says so loudly when it is called too late to have that effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS
from factory import save, synthetic_cxr
from peers import free_port, stop, wait_for_port

NIDAAN = str(Path(sys.executable).parent / "nidaan")


def _environment() -> dict[str, str]:
    """This environment without NUMBA_CACHE_DIR (the config alone must name the cache) and
    without NIDAAN_* overrides of the config."""
    return {
        k: v
        for k, v in os.environ.items()
        if k != "NUMBA_CACHE_DIR" and not k.startswith("NIDAAN_")
    }


def _config(tmp_path: Path, cache: Path, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[models]\nrepository = "{MODELS}"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[kernels]\nbackend = "cpu"\ncache_dir = "{cache}"\n{extra}'
    )
    return path


def _cached(cache: Path) -> set[str]:
    """The kinds of Numba cache file under ``cache``: index (.nbi) and compiled code (.nbc)."""
    return {p.suffix for p in cache.rglob("*") if p.suffix in (".nbi", ".nbc")}


def test_analyze_caches_the_kernels_in_kernels_cache_dir(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"  # not there yet: the command makes it
    ds, _ = synthetic_cxr(81, rows=64, columns=64)  # tiny: the compilation is the cost
    image = save(ds, tmp_path / "tiny.dcm")
    run = subprocess.run(
        [NIDAAN, "--config", str(_config(tmp_path, cache)), "analyze", "--quiet", str(image)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_environment(),
    )
    assert run.returncode == 0, run.stderr
    assert "nodule" in run.stdout  # the radiograph model ran, so the kernels were compiled
    assert "has no effect" not in run.stderr
    assert _cached(cache) == {".nbi", ".nbc"}


def test_serve_caches_the_kernels_in_kernels_cache_dir(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    port = free_port()
    extra = (
        f'[dicom]\nbind = "127.0.0.1"\nport = {port}\n[grpc]\nbind = "127.0.0.1"\n'
        f"port = {free_port()}\n"
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [NIDAAN, "--config", str(_config(tmp_path, cache, extra)), "serve", "--no-http"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_environment(),
        )
    try:
        wait_for_port(port, timeout=240, proc=server)  # it listens after warming the kernels
    finally:
        stop(server)
    assert "has no effect" not in log.read_text()
    assert _cached(cache) == {".nbi", ".nbc"}


def test_configure_cache_warns_when_the_kernels_were_imported_first(tmp_path: Path) -> None:
    from nidaan.kernels import configure_cache

    # This process imported the kernels long ago, with another (or no) NUMBA_CACHE_DIR.
    with pytest.warns(RuntimeWarning, match="kernels.cache_dir .* has no effect"):
        assert configure_cache(str(tmp_path / "too-late")) is False
    assert os.environ.get("NUMBA_CACHE_DIR") != str(tmp_path / "too-late")  # not pretended
    assert configure_cache("") is True  # nothing asked
