"""Example services used by npipe's docs, CLI demos and tests."""
