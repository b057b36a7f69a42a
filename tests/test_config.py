from pathlib import Path

import pytest

from nidaan.core.config import SOURCE, load_config
from nidaan.core.errors import ConfigError


def test_embedded_defaults_match_the_contract() -> None:
    cfg = load_config(None, environ={})
    assert (cfg.dicom.ae_title, cfg.dicom.port, cfg.grpc.port, cfg.http.port) == (
        "NIDAAN",
        11112,
        50051,
        8080,
    )
    assert cfg.storage.data_dir == Path("./nidaan-data")
    assert cfg.models.repository == Path("./models")
    assert cfg.inference.backend == "onnxruntime"
    assert cfg.dicom.study_idle_timeout_s == 5.0
    assert cfg.reports.destinations == [SOURCE]


def test_toml_then_env_override(tmp_path: Path) -> None:
    path = tmp_path / "nidaan.toml"
    path.write_text(
        '[dicom]\nae_title = "AI_NODE"\nport = 4000\n'
        '[reports]\ndestinations = ["PACS1", "@source"]\n'
        '[[peers]]\nae_title = "PACS1"\nhost = "127.0.0.1"\nport = 4242\n'
    )
    cfg = load_config(
        path, environ={"NIDAAN_DICOM_PORT": "4001", "NIDAAN_STORAGE_DATA_DIR": str(tmp_path / "d")}
    )
    assert cfg.dicom.ae_title == "AI_NODE"
    assert cfg.dicom.port == 4001
    assert cfg.storage.data_dir == tmp_path / "d"
    assert cfg.peer("PACS1") is not None and cfg.peer("PACS1").port == 4242  # type: ignore[union-attr]
    assert cfg.reports.destinations == ["PACS1", SOURCE]


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[dicom]\nport = 70000\n", {}, "dicom.port"),
        ("[dicom]\nprot = 1\n", {}, "unknown key 'prot'"),
        ('[dicom]\nae_title = "THIS_AE_TITLE_IS_TOO_LONG"\n', {}, "AE title"),
        (
            '[reports]\ndestinations = ["NOWHERE"]\n',
            {},
            "'NOWHERE', which is not a configured peer",
        ),
        ('[inference]\nbackend = "tensorflow"\n', {}, "inference.backend"),
        ('[inference]\ntriton_shared_memory = "nvlink"\n', {}, "inference.triton_shared_memory"),
        ("[inference]\nworkers = 0\n", {}, "inference.workers must be at least 1"),
        ("[grpc]\ntls = true\n", {}, "grpc.tls = true needs dicom.tls_certificate"),
        ("[kernels]\ngpu_max_batch = 0\n", {}, "kernels.gpu_max_batch must be at least 1"),
        ("", {"NIDAAN_KERNELS_GPU_MAX_DELAY_MS": "-1"}, "kernels.gpu_max_delay_ms"),
        ("", {"NIDAAN_INFERENCE_MAX_QUEUE_IMAGES": "0"}, "inference.max_queue_images"),
        ("[nonsense]\n", {}, "unknown section"),
        ("", {"NIDAAN_DICOM_PORT": "eleven"}, "NIDAAN_DICOM_PORT"),
        ("not toml at all [", {}, "not valid TOML"),
    ],
)
def test_bad_config_is_refused_with_a_message_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(path, environ=env)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", environ={})


def _documented_keys() -> dict[str, set[str]]:
    """The keys docs/configuration.md shows, by section, from its TOML blocks (each must parse:
    a reader copies them)."""
    import re
    import tomllib

    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    out: dict[str, set[str]] = {}
    for block in re.findall(r"```toml\n(.*?)```", text, re.S):
        for section, value in tomllib.loads(block).items():
            tables = value if isinstance(value, list) else [value]
            out.setdefault(section, set()).update(k for t in tables for k in t)
    return out


def test_the_config_reference_lists_exactly_the_keys_of_the_code() -> None:
    """Every key of every section (and of [[peers]] and [[routes]]) is in docs/configuration.md,
    and nothing there is not a key: adding a setting without documenting it fails here."""
    import dataclasses

    from nidaan.core import config

    kinds = {"peers": config.Peer, "routes": config.Route}
    code = {
        f.name: {k.name for k in dataclasses.fields(kinds.get(f.name) or f.default_factory())}  # type: ignore[misc]
        for f in dataclasses.fields(config.Config)
    }
    documented = _documented_keys()
    assert set(documented) == set(code), "sections"
    for section, keys in code.items():
        assert documented[section] == keys, (
            f"[{section}]: not documented {sorted(keys - documented[section])}, "
            f"documented but not in the code {sorted(documented[section] - keys)}"
        )
