"""Former home of the publisher; the names stay importable from here.

``kwsd.mqtt.connection`` holds the broker connection loop, ``kwsd.mqtt.publisher`` the topics and callbacks,
``kwsd.toggles`` the Hermes toggle state.
"""

from kwsd.mqtt.publisher import Publisher, PublisherCounters
from kwsd.toggles import ToggleState

__all__ = ["Publisher", "PublisherCounters", "ToggleState"]
