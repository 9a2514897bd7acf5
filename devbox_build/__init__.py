"""devbox-build: locked dependency files → layered CPU/GPU images."""

# The one place the version is written (pyproject reads it). A release is a CHANGELOG.md entry
# with this version and a git tag of the same name, which generated projects record and pin.
__version__ = "0.3.3"
