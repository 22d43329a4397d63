"""The false-wake review loop: an archive of every wake (and near miss) with its audio, verdicts fed back over MQTT
or ``kwsd review mark``, the effective wake rate, and exports that ``kwsd eval`` reads."""
