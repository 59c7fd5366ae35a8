"""Sans-I/O protocol parsers: bytes in; a value, None for "need more", or ProtocolError out.

Nothing here imports asyncio, socket, ssl or logging, so every parser is testable with plain bytes
and fuzzable. Each buffer a parser may ask its caller to hold has a named cap citing its spec.
"""
