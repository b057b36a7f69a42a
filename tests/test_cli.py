"""The ``nidaan`` command as a user runs it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS
from factory import sample_file, save, synthetic_cxr

NIDAAN = str(Path(sys.executable).parent / "nidaan")


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env_cfg = ["--config", str(cwd / "c.toml")] if cwd else []
    return subprocess.run(
        [NIDAAN, *env_cfg, *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _config(tmp_path: Path) -> Path:
    (tmp_path / "c.toml").write_text(
        f'[models]\nrepository = "{MODELS}"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'
    )
    return tmp_path


def test_models_lists_and_validates(tmp_path: Path) -> None:
    run = _run("models", cwd=_config(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "cxr_screen" in run.stdout and "not for diagnosis" in run.stdout
    assert "model(s) valid" in run.stdout


def test_analyze_files_and_folders_as_json(tmp_path: Path) -> None:
    nodule, _ = synthetic_cxr(21, nodule=True)
    folder = tmp_path / "in"
    save(nodule, folder / "nodule.dcm")
    (folder / "notes.txt").write_text("not dicom")
    run = _run(
        "analyze",
        "--json",
        "--quiet",
        str(folder),
        str(sample_file("RG1_J2KR.dcm")),
        cwd=_config(tmp_path),
    )
    assert run.returncode == 1  # one input was not DICOM: reported, the rest analysed
    assert "notes.txt: not a readable DICOM file" in run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rows) == 2
    by_file = {Path(r["file"]).name: r for r in rows}
    found = {f["label"]: f for f in by_file["nodule.dcm"]["findings"]}
    assert found["nodule"]["present"] and found["nodule"]["region"] is not None
    assert by_file["nodule.dcm"]["not_for_diagnosis"] is True


def test_bad_config_exits_2_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[dicom]\nport = -1\n")
    run = _run("models", cwd=tmp_path)
    assert run.returncode == 2
    assert "dicom.port" in run.stderr


def test_doctor_reports_each_check(tmp_path: Path) -> None:
    run = _run("doctor", cwd=_config(tmp_path))
    assert "[ok] configuration is valid" in run.stdout
    assert "[ok] model repository" in run.stdout
    assert "ONNX Runtime providers" in run.stdout
    # The defaults listen on every interface, accepting anyone: doctor says so.
    assert "[warn] DICOM listens on 0.0.0.0:11112 and accepts any caller" in run.stdout


def test_doctor_echoes_each_peer_and_names_a_taken_port(tmp_path: Path) -> None:
    """A peer that answers (dcmtk's storescp), one that does not, and a DICOM port in use."""
    from peers import StoreSCP, free_port, stop

    pacs_port, dead_port = free_port(), free_port()
    pacs = StoreSCP(pacs_port, tmp_path / "pacs", aet="PACS")
    pacs.start()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        (tmp_path / "c.toml").write_text(
            f'[models]\nrepository = "{MODELS}"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'
            f'[dicom]\nbind = "127.0.0.1"\nport = {taken.getsockname()[1]}\n'
            "require_known_callers = true\n"
            f'[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
            f'[[peers]]\nae_title = "GONE"\nhost = "127.0.0.1"\nport = {dead_port}\n'
        )
        run = _run("doctor", cwd=tmp_path)
    finally:
        taken.close()
        stop(pacs.process)
    out = run.stdout
    assert run.returncode == 1
    assert f"[ok] peer PACS at 127.0.0.1:{pacs_port} answers C-ECHO" in out
    assert f"[FAIL] peer GONE at 127.0.0.1:{dead_port}: no association with" in out
    assert "[FAIL] DICOM port" in out and "is taken" in out and "set dicom.port" in out
    assert "[warn] DICOM" not in out  # loopback, and only known callers


def test_an_unusable_data_dir_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "c.toml").write_text(
        f'[models]\nrepository = "{MODELS}"\n[storage]\ndata_dir = "{blocker / "data"}"\n'
        '[dicom]\nbind = "127.0.0.1"\nport = 0\n[grpc]\nbind = "127.0.0.1"\nport = 0\n'
        '[http]\nbind = "127.0.0.1"\nport = 0\n'
    )
    run = _run("serve", cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("nidaan: error: storage.data_dir: cannot use")
    assert "Not a directory" in lines[0] and "Traceback" not in run.stderr


def test_a_missing_model_repository_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f'[models]\nrepository = "{tmp_path / "none"}"\n')
    run = _run("serve", cwd=tmp_path)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("nidaan: error: models.repository:") and "does not exist" in line


def _ports_config(tmp_path: Path, ports: dict[str, int], extra: str = "") -> Path:
    (tmp_path / "c.toml").write_text(
        f'[models]\nrepository = "{MODELS}"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        + "".join(f'[{k}]\nbind = "127.0.0.1"\nport = {v}\n' for k, v in ports.items())
        + extra
    )
    return tmp_path


@pytest.mark.parametrize("setting", ["dicom", "grpc", "http"])
def test_a_taken_port_is_one_line_naming_the_setting_and_value(
    tmp_path: Path, setting: str
) -> None:
    """Another program listens on the port: `nidaan serve` says which setting and which port
    in one line (no traceback, no gRPC core log, no shutdown chatter) and exits non-zero."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    ports = {"dicom": 0, "grpc": 0, "http": 0} | {setting: port}
    try:
        run = _run("serve", cwd=_ports_config(tmp_path, ports))
    finally:
        taken.close()
    assert run.returncode != 0
    (line,) = run.stderr.strip().splitlines()
    assert line == (
        f"nidaan: error: {setting}.port: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert run.stdout == ""


def _popen_serve(tmp_path: Path) -> subprocess.Popen:
    """`nidaan serve` on ``tmp_path``'s c.toml, its output piped."""
    return subprocess.Popen(
        [NIDAAN, "--config", str(tmp_path / "c.toml"), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _serve(tmp_path: Path, extra: str) -> tuple[subprocess.Popen, dict[str, int]]:
    """`nidaan serve` on free loopback DICOM and gRPC ports and an HTTP port on every
    interface; returns once it says it is up."""
    from peers import free_port

    ports = {"dicom": free_port(), "grpc": free_port(), "http": free_port()}
    _ports_config(tmp_path, {k: v for k, v in ports.items() if k != "http"})
    with open(tmp_path / "c.toml", "a") as f:
        f.write(f'[http]\nbind = "0.0.0.0"\nport = {ports["http"]}\n{extra}')
    proc = _popen_serve(tmp_path)
    assert proc.stdout is not None
    up = proc.stdout.readline()
    assert up.startswith("nidaan: AE NIDAAN on DICOM port"), proc.communicate(timeout=30)
    return proc, ports


def _stop(proc: subprocess.Popen) -> str:
    """Stop `nidaan serve` as an operator does (SIGINT); what it logged."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_serve_warns_of_an_open_status_page_and_says_where_an_unknown_callers_report_went(
    tmp_path: Path,
) -> None:
    """An HTTP port on every interface without a token or TLS: `serve` warns what it shows and
    how to protect it. A study from WARD, which is not a configured peer while PACS is: the log
    says the report was kept, not sent, and how to have it delivered."""
    from netutil import c_store
    from peers import free_port, wait_until

    peer = f'[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {free_port()}\n'
    proc, ports = _serve(tmp_path, peer)
    try:
        ds, _ = synthetic_cxr(24, rows=300, columns=300)
        (ok,) = c_store(ports["dicom"], [ds], calling="WARD")
        assert ok.Status == 0x0000
        reports = tmp_path / "data" / "reports"
        wait_until(lambda: list(reports.glob("*.dcm")), 120, "the report in reports/")
    finally:
        err = _stop(proc)
    warning = next(line for line in err.splitlines() if "the status page and metrics" in line)
    assert "WARNING" in warning and f"0.0.0.0:{ports['http']} for anyone" in warning
    assert "resend dead letters" in warning and "http.tokens_file" in warning
    assert "counts only" not in warning
    (note,) = [line for line in err.splitlines() if "not sent" in line]
    assert "the sender, AE 'WARD', is not a configured peer" in note
    assert "reports/ folder" in note  # what happened to it
    assert "add a [[peers]] entry with ae_title = 'WARD'" in note  # how to deliver it
    assert "have the study sent again" in note
    assert "no destination is configured" not in err


def test_serve_does_not_warn_of_a_status_page_protected_by_tokens(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("a-token-of-twenty-characters-or-more\n")
    proc, _ = _serve(tmp_path, f'tokens_file = "{tmp_path / "tokens"}"\n')
    err = _stop(proc)
    assert "the status page and metrics" not in err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_serve_starts_stops_it_cleanly(tmp_path: Path, sig: int) -> None:
    """An operator's Ctrl-C, or an init system's SIGTERM, that lands while `serve` is still
    starting its codec and report processes (after the ports opened, before the ready line):
    it stops cleanly with status 0, not with a KeyboardInterrupt traceback or killed by the
    signal, and its DICOM port is closed afterwards."""
    from peers import free_port

    ports = {"dicom": free_port(), "grpc": free_port(), "http": free_port()}
    _ports_config(tmp_path, ports)
    proc = _popen_serve(tmp_path)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the ports are open once this line is logged; the pools are not
        seen.append(line)
        if "listening as NIDAAN" in line:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["dicom"]), timeout=2).close()


def test_exposure_warnings_leave_out_a_protected_status_page() -> None:
    from nidaan.core.config import load_config
    from nidaan.server.cli import exposure_warnings

    cfg = load_config(None, environ={})
    assert any("status page" in w for w in exposure_warnings(cfg))  # 0.0.0.0, open
    cfg.http.tls = True
    assert not any("status page" in w for w in exposure_warnings(cfg))
    cfg.http.tls, cfg.http.tokens_file = False, "/etc/nidaan/tokens"
    assert not any("status page" in w for w in exposure_warnings(cfg))
