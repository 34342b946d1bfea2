"""Built-in plugins, one module or small package per optimization.

Each is declared in our pyproject under the entry-point group
`overdrive.plugins`, the same door third-party plugins use.
"""
