"""Unit tests of pointsman.bgp: decisions, ExaBGP text, the announcer with a recording speaker."""
