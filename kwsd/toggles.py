"""Hermes ``toggleOff``/``toggleOn`` per site: detection is off while any reason is outstanding.

Kept by the part that decides whether a detection counts (the pipeline), so that it survives a reload of the
MQTT side; the MQTT publisher only reports each toggle through ``on_toggle(site, enabled, reason)``.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

MAX_SITES = 1024
"""Sites with reasons outstanding; beyond this a new toggleOff is refused (detection stays on there)."""
MAX_REASONS = 32
"""Outstanding reasons per site; beyond this a new reason is refused."""


class ToggleState:
    """Thread-safe, bounded set of outstanding toggleOff reasons per site."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[str, set[str]] = {}

    def apply(self, site: str, enabled: bool, reason: str = "") -> bool:
        """A ``toggleOn`` (``enabled``) or ``toggleOff`` for ``site``; returns whether detection is on afterwards."""
        return self.on(site, reason) if enabled else self.off(site, reason)

    def off(self, site: str, reason: str = "") -> bool:
        """Add ``reason``; returns whether the site is enabled afterwards (False unless a bound refused it)."""
        with self._lock:
            reasons = self._reasons.get(site)
            if reasons is None:
                if len(self._reasons) >= MAX_SITES:
                    log.warning("toggleOff for site %r ignored: %d sites are toggled off already", site, MAX_SITES)
                    return True
                reasons = self._reasons[site] = set()
            if reason not in reasons and len(reasons) >= MAX_REASONS:
                log.warning("toggleOff reason %r for site %r ignored: %d reasons outstanding", reason, site,
                            MAX_REASONS)
                return False
            reasons.add(reason)
            return False

    def on(self, site: str, reason: str = "") -> bool:
        """Clear ``reason``; returns whether the site is enabled afterwards."""
        with self._lock:
            reasons = self._reasons.get(site)
            if reasons is not None:
                reasons.discard(reason)
                if not reasons:
                    del self._reasons[site]
            return site not in self._reasons

    def enabled(self, site: str) -> bool:
        with self._lock:
            return site not in self._reasons

    def reasons(self, site: str) -> frozenset[str]:
        with self._lock:
            return frozenset(self._reasons.get(site, ()))
