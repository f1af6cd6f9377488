"""The server: ``signaling-sharded`` (see ``cli``).

The process model, top down, each module importing only those below it
(an import-linter contract in pyproject.toml checks it):

- ``cli``: the command line and its checks;
- ``supervisor``: starts the workers, restarts them, drains;
- ``worker``: one event loop, its ``Hub`` (the Rust core) and its timers;
- ``acceptor``, ``cluster``: accepting and routing connections to their
  topic's worker; the link to Redis in cluster mode;
- ``handshake``, ``handoff``: one connection up to its upgrade; passing
  sockets between workers;
- ``routing``, ``auth``: where a request is served; tokens;
- ``config``, ``logs``: the settings; JSON-lines logging.
"""
