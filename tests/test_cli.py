"""The ``nidaan`` command as a user runs it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

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
