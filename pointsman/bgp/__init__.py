"""VIP announcement by BGP, gated by health: ExaBGP announces each VIP while its pool can serve.

- `decision`: pure rules, what to announce given pool, listener and node state;
- `exabgp`: ExaBGP's config, environment and API lines, as text;
- `speaker`: the ExaBGP child process and the relay connection to it (the only I/O);
- `relay`: the helper ExaBGP runs, joining its stdin/stdout to pointsman's socket;
- `announcer`: keeps ExaBGP's announcements equal to the decisions.
"""
