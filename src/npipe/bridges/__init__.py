"""Bridges between pipes and other byte streams.

- :func:`start_forward`: TCP or Unix socket -> a new instance of a pipe per connection
  (``npipe forward``).
- :func:`start_expose`: a pipe -> a TCP or Unix socket target per caller (``npipe expose``).
- :func:`relay_stdio`: stdin/stdout <-> a pipe (``npipe relay``).

All three copy with one core, :func:`npipe.bridges.relay.relay` (backpressure,
half-close where the transport has it, byte counts).
"""

from npipe.bridges.endpoint import Endpoint, parse_endpoint
from npipe.bridges.expose import Expose, start_expose
from npipe.bridges.forward import Forward, start_forward
from npipe.bridges.relay import RelayStats, Side, relay
from npipe.bridges.stdio import relay_stdio

__all__ = [
    "Endpoint",
    "Expose",
    "Forward",
    "RelayStats",
    "Side",
    "parse_endpoint",
    "relay",
    "relay_stdio",
    "start_expose",
    "start_forward",
]
