"""The tiny controlled experiment behind ``expo-ray demo``, and the tiny checkpoints tests build."""
