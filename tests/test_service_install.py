"""scripts/install staged under a DESTDIR: layout, idempotence, config kept, uninstall and purge."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from kwsd.settings import load

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"

CONFIG = """\
# site config
model:
  path: models/kwsd-xiaoyun.onnx
service:
  log_level: info
"""


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    models = tmp_path / "models"
    models.mkdir()
    (models / "kwsd-xiaoyun.onnx").write_bytes(b"\x08\x09onnx-bytes")
    (models / "kwsd-xiaoyun.json").write_text('{"sha256": "..."}')
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    return config, models


def _install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DESTDIR"}
    result = subprocess.run(
        ["bash", str(INSTALL), "--destdir", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_upgrade_uninstall_purge(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    config, models = sources
    root = tmp_path / "root"
    args = ("--no-venv", "--config", str(config), "--models", str(models))
    _install(root, *args)

    unit = root / "etc/systemd/system/kwsd.service"
    assert unit.read_text() == (REPO / "systemd/kwsd.service").read_text()
    assert (root / "opt/kwsd/models/kwsd-xiaoyun.onnx").read_bytes() == b"\x08\x09onnx-bytes"
    assert (root / "opt/kwsd/models/kwsd-xiaoyun.json").is_file()
    assert (root / "opt/kwsd/doc/service.md").is_file()
    installed = root / "etc/kwsd/config.yaml"
    assert _mode(installed) == 0o640 and _mode(installed.parent) == 0o750
    assert _mode(root / "var/lib/kwsd") == 0o750
    # The model path now points at the installed copy, not at /etc/kwsd/models.
    assert load(installed).model.path == Path("/opt/kwsd/models/kwsd-xiaoyun.onnx")
    assert not list(root.rglob(".models.*")) and not list(root.rglob(".config.*"))

    # Upgrade: the administrator's config is kept, the model folder is replaced as a whole.
    installed.write_text(installed.read_text() + "# edited by the administrator\n")
    (models / "kwsd-xiaoyun.json").unlink()
    (models / "kwsd-xiaoyun.onnx").write_bytes(b"new model")
    result = _install(root, *args)
    assert "kept existing /etc/kwsd/config.yaml" in result.stdout
    assert installed.read_text().endswith("# edited by the administrator\n")
    assert (root / "opt/kwsd/models/kwsd-xiaoyun.onnx").read_bytes() == b"new model"
    assert not (root / "opt/kwsd/models/kwsd-xiaoyun.json").exists()

    (root / "var/lib/kwsd/outbox").mkdir()
    result = _install(root, "--uninstall")
    assert not unit.exists() and not (root / "opt/kwsd").exists()
    assert installed.exists() and (root / "var/lib/kwsd/outbox").exists()
    _install(root, "--uninstall")  # again: nothing left to remove is fine

    _install(root, "--uninstall", "--purge")
    assert not (root / "etc/kwsd").exists() and not (root / "var/lib/kwsd").exists()


def test_the_shipped_config_points_at_the_installed_model(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    _, models = sources
    root = tmp_path / "root"
    _install(root, "--no-venv", "--models", str(models))  # the checkout's own config.yaml
    installed = root / "etc/kwsd/config.yaml"
    assert load(installed).model.path == Path("/opt/kwsd/models/kwsd-xiaoyun.onnx")
    # Only the model path changed; every comment of the documented default config is still there.
    original = (REPO / "config.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, installed.read_text().splitlines(), strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in changed] == ["path: /opt/kwsd/models/kwsd-xiaoyun.onnx"]


def test_refuses_without_a_model(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    config, _ = sources
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _install(tmp_path / "root", "--no-venv", "--config", str(config), "--models", str(empty), check=False)
    assert result.returncode != 0
    assert f"no exported model (*.onnx) in {empty}" in result.stderr
    assert not (tmp_path / "root/opt").exists()


def test_venv_path_checks_the_interpreter_first(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    """Without --no-venv the installer builds /opt/kwsd/venv; a missing interpreter stops it first."""
    config, models = sources
    result = _install(
        tmp_path / "root",
        "--config", str(config), "--models", str(models), "--python", "/nonexistent/python3",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "/nonexistent/python3 not found" in result.stderr
    assert not (tmp_path / "root/opt").exists()


def test_bad_option(tmp_path: Path) -> None:
    result = _install(tmp_path / "root", "--frobnicate", check=False)
    assert result.returncode != 0 and "unknown option --frobnicate" in result.stderr
    result = _install(tmp_path / "root", "--purge", check=False)
    assert result.returncode != 0 and "--purge only goes with --uninstall" in result.stderr


def test_state_folder_and_everything_in_it_go_to_the_service_user(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    """An outbox left root-owned by an earlier ``kwsd run`` as root is handed to the service user (here nobody,
    through --owner, which a real install sets to kwsd:kwsd)."""
    import grp
    import pwd

    config, models = sources
    root = tmp_path / "root"
    outbox = root / "var/lib/kwsd/outbox"
    outbox.mkdir(parents=True)
    (outbox / "outbox.sqlite3").write_bytes(b"root's")
    (outbox / "outbox.sqlite3-wal").write_bytes(b"")
    assert os.geteuid() == 0, "the tests run as root (TESTING.md); chown needs it"
    result = _install(root, "--no-venv", "--config", str(config), "--models", str(models), "--owner", "nobody:nogroup")
    assert "/var/lib/kwsd and everything in it owned by nobody:nogroup" in result.stdout
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    for path in [root / "var/lib/kwsd", *(root / "var/lib/kwsd").rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody, nogroup), path
    conf = root / "etc/kwsd/config.yaml"
    assert (conf.stat().st_uid, conf.stat().st_gid) == (0, nogroup)
    result = _install(root, "--no-venv", "--owner", "nobody", check=False)
    assert result.returncode != 0 and "--owner needs USER:GROUP, got nobody" in result.stderr


def test_help_says_destdir_is_for_staging(tmp_path: Path) -> None:
    help_text = _install(tmp_path / "root", "--help").stdout
    assert "Staging only: a venv" in help_text and "--no-venv" in help_text and "--owner U:G" in help_text
