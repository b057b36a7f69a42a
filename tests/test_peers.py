"""Peer programs are found unambiguously: the system's dcmtk, not a same-named impostor first on
PATH (pynetdicom installs console scripts called storescp, storescu, echoscu, findscu)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import peers
from netutil import storescu
from peers import need

IMPOSTOR = """#!/bin/sh
echo "usage: storescp [options] port" >&2
exit 2
"""


def _impostor(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / "storescp"
    fake.write_text(IMPOSTOR)
    fake.chmod(0o755)
    return fake


def _is_dcmtk_storescp(path: str) -> bool:
    run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return run.stdout.startswith("$dcmtk: storescp v")


def test_a_fake_storescp_first_on_path_is_passed_over(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = _impostor(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    found = need("storescp")
    assert found != str(fake)
    assert _is_dcmtk_storescp(found), found


def test_a_fake_storescp_in_a_system_directory_is_refused_by_its_banner(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    fake = _impostor(tmp_path / "usr-local-bin")
    # As if `sudo pip install pynetdicom` had put its storescp in /usr/local/bin.
    monkeypatch.setattr(peers, "SYSTEM_BIN_DIRS", (str(fake.parent), *peers.SYSTEM_BIN_DIRS))
    found = need("storescp")
    assert found != str(fake)
    assert _is_dcmtk_storescp(found), found


def test_the_virtual_environments_bin_is_never_searched(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    venv_bin = Path(sys.executable).parent
    monkeypatch.setenv("PATH", f"{venv_bin}:{os.environ['PATH']}")
    for program in ("storescp", "storescu", "echoscu"):
        found = need(program)
        assert Path(found).parent != venv_bin
        assert peers._banner(found, peers.PROGRAMS[program]).startswith(f"$dcmtk: {program} v")


def test_only_impostors_found_names_them_and_the_debian_package(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    fake = _impostor(tmp_path / "bin")
    monkeypatch.setattr(peers, "SYSTEM_BIN_DIRS", (str(fake.parent),))
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        need("storescp")
    message = str(skipped.value)
    assert "apt-get install dcmtk" in message and str(fake) in message
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install dcmtk"):
        need("storescp")


def _sends_with_dcmtk(port: int) -> None:
    storescu(port, [])  # netutil.storescu -> peers.need("storescu")


def _pure(port: int) -> int:
    return port + 1


def test_the_peers_marker_follows_helpers_to_the_process_they_start() -> None:
    from conftest import _starts_processes

    def a_new_peer_test() -> None:
        _sends_with_dcmtk(11112)

    def a_unit_test() -> None:
        assert _pure(1) == 2

    assert _starts_processes(a_new_peer_test, set())
    assert not _starts_processes(a_unit_test, set())
