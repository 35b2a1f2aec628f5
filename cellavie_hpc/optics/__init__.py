"""Optics: angular-spectrum propagation of complex fields and autofocus (pure TensorFlow functions)."""
