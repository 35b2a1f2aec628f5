"""Single-device performance: the methodology sweep, the largest-batch search and a portable (any Keras back-end) bench."""
