"""devbox-build: locked dependency files → layered CPU/GPU images."""

__version__ = "0.1.0"
