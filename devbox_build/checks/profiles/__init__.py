"""The built-in check profiles, one module each; `devbox-build check --profile NAME` runs them.

Each check's docstring is the line `devbox-build check` prints for it, and each failure message
names what is wrong, so a red check reads as a bug report.
"""
