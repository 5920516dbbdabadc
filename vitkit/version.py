"""vitkit's version, in a module of its own so that any module may read it without importing the whole package
(`vitkit/__init__.py` imports the model and interop layers; a module below them that imported it would close a
cycle). Keep it equal to `version` in pyproject.toml."""

__version__ = "0.1.0"
