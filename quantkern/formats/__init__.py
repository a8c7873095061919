"""On-disk and kernel-native weight layouts."""
