"""The shipped unit: systemd's own parser accepts every line, and the sandbox scores well."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "kwsd.service"
INSTALLED_KWSD = "/opt/kwsd/venv/bin/kwsd"


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    return path


def _unit_with_existing_binary(tmp_path: Path, extra: str = "") -> Path:
    """A copy whose Exec lines name a binary that exists here (verify checks that), plus ``extra`` lines."""
    text = UNIT.read_text(encoding="utf-8")
    assert INSTALLED_KWSD in text
    text = text.replace(INSTALLED_KWSD, shutil.which("true") or "/bin/true")
    if extra:
        text = text.replace("[Service]\n", f"[Service]\n{extra}\n", 1)
    path = tmp_path / "kwsd.service"
    path.write_text(text, encoding="utf-8")
    return path


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_analyze(), "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)


def test_verify_is_silent(tmp_path: Path) -> None:
    result = _verify(_unit_with_existing_binary(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # verify exits 0 even for unknown keys and bad values; it only complains here


def test_verify_complains_about_a_bad_line(tmp_path: Path) -> None:
    """The check above can fail: a misplaced key is reported on stderr."""
    result = _verify(_unit_with_existing_binary(tmp_path, extra="StartLimitBurstt=5\nWatchdogSec=soon"))
    assert "StartLimitBurstt" in result.stderr
    assert "WatchdogSec" in result.stderr or "sec value" in result.stderr


def test_security_exposure_is_low(tmp_path: Path) -> None:
    result = subprocess.run(
        [_analyze(), "security", "--offline=true", "--no-pager", str(_unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for kwsd\.service:\s*([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0, result.stdout
    for key in ("RemoveIPC=", "PrivateMounts=", "ProtectSystem=", "NoNewPrivileges="):
        assert re.search(rf"✓ {key}", result.stdout), f"{key} not counted as set: {result.stdout}"


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_service_contract() -> None:
    """What the daemon and the installer rely on."""
    s = _settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ExecStart"] == [f"{INSTALLED_KWSD} run --config /etc/kwsd/config.yaml"]
    assert s["User"] == ["kwsd"]
    assert s["SupplementaryGroups"] == ["audio"]
    assert s["StateDirectory"] == ["kwsd"]
    assert s["ConfigurationDirectory"] == ["kwsd"]
    assert s["DeviceAllow"] == ["char-alsa rw"]
    assert s["CapabilityBoundingSet"] == [""]
    # Left off on purpose (systemd/README.md says why): each breaks audio capture or inference speed.
    for key in ("MemoryDenyWriteExecute", "PrivateUsers", "PrivateDevices", "ProcSubset", "IPAddressDeny"):
        assert key not in s, key
