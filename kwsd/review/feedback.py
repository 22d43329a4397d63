"""The inbound verdict message."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from kwsd.mqtt.messages import MessageError
from kwsd.review.store import VERDICTS, Verdict


@dataclass(frozen=True)
class Feedback:
    """Topic ``<prefix>/<siteId>/feedback`` (in), JSON: a verdict on what a site heard.

    ``{"sessionId": "...", "verdict": "false_wake" | "wake" | "missed"}``. ``false_wake``/``wake`` judge a wake
    (its ``sessionId`` from the wake event); ``missed`` on a near miss says it was the keyword; ``missed`` without a
    ``sessionId`` reports a wake the site did not hear at all (``wakewordId`` optional).
    """

    site_id: str
    verdict: Verdict
    session_id: str | None = None
    wakeword_id: str = ""

    WHAT: ClassVar[str] = "feedback"

    @staticmethod
    def topic(prefix: str, site_id: str) -> str:
        return f"{prefix}/{site_id}/feedback"

    @staticmethod
    def site_from_topic(prefix: str, topic: str) -> str | None:
        """The siteId of a ``<prefix>/<siteId>/feedback`` topic, or None for any other topic."""
        head, tail = f"{prefix}/", "/feedback"
        if not topic.startswith(head) or not topic.endswith(tail):
            return None
        site = topic[len(head):-len(tail)]
        return site if site and "/" not in site else None

    def to_payload(self) -> bytes:
        data: dict[str, str] = {"verdict": self.verdict}
        if self.session_id is not None:
            data["sessionId"] = self.session_id
        if self.wakeword_id:
            data["wakewordId"] = self.wakeword_id
        return json.dumps(data).encode("utf-8")

    @classmethod
    def from_payload(cls, payload: bytes | bytearray, site_id: str) -> Feedback:
        """Parse a payload; a MessageError names the field that is wrong."""
        try:
            data = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MessageError(f"{cls.WHAT}: payload is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise MessageError(f"{cls.WHAT}: expected a JSON object, got {type(data).__name__}")
        verdict = data.get("verdict")
        if verdict not in VERDICTS:
            raise MessageError(f"{cls.WHAT}: 'verdict' must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        session = data.get("sessionId")
        if session is not None and (not isinstance(session, str) or not session.strip()):
            raise MessageError(f"{cls.WHAT}: 'sessionId' must be a non-empty string, got {session!r}")
        if session is None and verdict != "missed":
            raise MessageError(f"{cls.WHAT}: 'sessionId' is required for verdict {verdict!r}")
        wakeword = data.get("wakewordId", "")
        if not isinstance(wakeword, str):
            raise MessageError(f"{cls.WHAT}: 'wakewordId' must be a string, got {wakeword!r}")
        return cls(site_id=site_id, verdict=verdict, session_id=session, wakeword_id=wakeword)
