"""expo-ray: ExPO weight extrapolation (theta = aligned + alpha * (aligned - sft)) on Ray."""

__version__ = "0.1.0"
