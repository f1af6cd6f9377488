"""Where a request is served: pure functions, no sockets.

A request is read once, by the Rust core (``RequestReader.read``): the
worker that accepted the connection reads it to choose the worker that
serves it (:func:`owner`), and that worker reads the same bytes again to
answer or upgrade. Both go through the same reader and this module, so
they cannot disagree about the topic a request joins.
"""

from __future__ import annotations

from signaling_sharded._native import Request, topic_owner

#: Files of the browser demo, served from the package's ``static`` folder.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/signaling.js": ("signaling.js", "text/javascript; charset=utf-8"),
}
#: The plain HTTP paths; any other path but ``/ws/{topic}`` is 404.
ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics", *STATIC_FILES})


def owner(request: Request, workers: int, here: int) -> int:
    """The worker that serves ``request`` among ``workers``: the owner of
    the topic it joins when it is an upgrade to a valid topic; else
    ``here``, the worker that read it (an answer needs no topic)."""
    if request.status == 0 and request.topic is not None:
        return topic_owner(request.topic, workers)
    return here
