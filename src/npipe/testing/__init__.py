"""Helpers for npipe's own tests and benchmarks, and for users who test code that uses npipe.

``npipe.testing.netns``: two hosts on one machine (network namespaces joined by a veth
link), a private smbd in the server's, and pipe server apps started in it. Nothing here
imports pytest at module level: benchmark scripts import it without pytest.
"""
