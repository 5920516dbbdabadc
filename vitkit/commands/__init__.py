"""One module per CLI verb; see vitkit/cli.py."""
