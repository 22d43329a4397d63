"""Where the exported model is when neither ``--model`` nor ``--config`` names one.

``kwsd detect`` and ``kwsd eval`` work from any folder: the model is looked for, in order, as
``models/kwsd-xiaoyun.onnx`` below the current folder (a checkout), at ``model.path`` of the installed config
(``/etc/kwsd/config.yaml``), in the installed model folder (``/opt/kwsd/models``, ``scripts/install``), and in
the checkout this kwsd runs from (where ``scripts/setup`` exports it).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAME = "kwsd-xiaoyun.onnx"
SYSTEM_CONFIG = Path("/etc/kwsd/config.yaml")
INSTALLED_MODELS = Path("/opt/kwsd/models")
CHECKOUT_MODELS = Path(__file__).resolve().parents[2] / "models"


def model_candidates(
    system_config: Path = SYSTEM_CONFIG,
    installed: Path = INSTALLED_MODELS,
    checkout: Path = CHECKOUT_MODELS,
) -> list[Path]:
    """The places looked at, in order (see the module docstring)."""
    found = [Path.cwd() / "models" / MODEL_NAME]
    if system_config.is_file():
        from kwsd import settings

        try:
            found.append(settings.load(system_config).model.path)
        except settings.ConfigError as exc:  # unreadable for this user, or invalid: not this command's business
            log.debug("not using %s for the model path: %s", system_config, exc)
    found += [installed / MODEL_NAME, checkout / MODEL_NAME]
    return list(dict.fromkeys(found))


def default_model(**places: Path) -> Path:
    """The first candidate that exists; if none does, the checkout's (so the error names where set-up puts it)."""
    candidates = model_candidates(**places)
    for path in candidates:
        if path.is_file():
            log.debug("model: %s", path)
            return path
    log.debug("no exported model in any of %s", ", ".join(map(str, candidates)))
    return candidates[-1]
