"""Runtime layer: expert residency, MoE dispatch, sampling and generation state."""
