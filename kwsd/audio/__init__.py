"""Audio capture: ring buffers, devices (PortAudio/PulseAudio), resampling, replay sources."""
