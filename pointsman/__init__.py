"""pointsman: a Layer 4 (TCP/UDP) load balancer.

It routes connections by address, port and connection state, never by payload.
"""

__version__ = "0.1.0"
