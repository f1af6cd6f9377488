"""The browser demo: two headless Chromium pages chat over a WebRTC DataChannel.

The pages load `/` and `/signaling.js` from the real server, join one topic
through it, negotiate a peer connection with each other and then exchange
chat messages peer to peer. Needs Playwright for Python and a Chromium at
/usr/bin/chromium (the system browser; Playwright's own download is not used).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from conftest import Server
from wsclient import OP_TEXT, RawClient, http_get

from testkit.proxy import Proxy

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
"""The browser: Debian's chromium by default (``make test`` installs it)."""
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000
"""Longest wait for any one step, in milliseconds; each step usually takes well under 1 s."""


def test_demo_files_are_served(server: Server) -> None:
    for path, content_type in [("/", "text/html"), ("/signaling.js", "text/javascript")]:
        response = http_get(server.port, path)
        assert response.status == 200, path
        assert response.headers["content-type"].startswith(content_type), response.headers
        assert int(response.headers["content-length"]) > 1000, path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (install the chromium package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'playwright>=1.45')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[str], Page]]:
    """A factory of pages, each in its own browser context; uncaught page errors fail the test."""
    contexts = []
    errors: list[str] = []

    def open_(url: str) -> Page:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: errors.append(f"{url}: {error}"))
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == [], errors


def join(page: Page) -> str:
    """Click Join and return the page's selfId once the server has welcomed it."""
    page.click("#join")
    page.wait_for_function("document.body.dataset.selfId")
    self_id: str = page.evaluate("document.body.dataset.selfId")
    assert len(self_id) == 26, self_id
    return self_id


def say(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def test_two_pages_chat_over_a_data_channel(
    server: Server, open_page: Callable[[str], Page]
) -> None:
    from playwright.sync_api import expect

    topic = f"browser {uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{server.port}/?topic={topic.replace(' ', '%20')}"
    page_a, page_b = open_page(url), open_page(url)
    assert page_a.input_value("#topic") == topic
    id_a, id_b = join(page_a), join(page_b)
    assert id_a != id_b

    # Each sees exactly the other, then the data channel between them opens.
    for page, other in [(page_a, id_b), (page_b, id_a)]:
        expect(page.locator("#peers li")).to_have_count(1, timeout=TIMEOUT_MS)
        peer = page.locator(f'#peers li[data-peer-id="{other}"]')
        expect(peer).to_have_attribute("data-channel", "open", timeout=TIMEOUT_MS)
        assert page.evaluate("window.demo.mesh.openPeers") == [other]

    say(page_a, "hello from A")
    received = page_b.locator(f'#log [data-from="{id_a}"] .text')
    expect(received).to_have_text(["hello from A"], timeout=TIMEOUT_MS)

    say(page_b, "hi A, B here")
    received = page_a.locator(f'#log [data-from="{id_b}"] .text')
    expect(received).to_have_text(["hi A, B here"], timeout=TIMEOUT_MS)

    # Each page logs its own message under its own id, and nothing else arrived.
    expect(page_a.locator("#log [data-from]")).to_have_count(2)
    expect(page_b.locator("#log [data-from]")).to_have_count(2)
    assert page_a.evaluate("window.demo.client.peers.size") == 1

    # When B leaves, A's view drops it.
    page_b.click("#leave")
    expect(page_a.locator("#peers li")).to_have_count(0, timeout=TIMEOUT_MS)


def test_a_refused_join_is_shown_in_the_page(
    start_server: Callable[..., Server], open_page: Callable[[str], Page]
) -> None:
    from playwright.sync_api import expect

    server = start_server("--max-peers-per-topic", "1")
    url = f"http://127.0.0.1:{server.port}/#full"
    first, second = open_page(url), open_page(url)
    join(first)
    second.click("#join")
    expect(second.locator("#status")).to_contain_text("topic_full", timeout=TIMEOUT_MS)
    expect(second.locator("#status")).to_have_attribute("data-level", "error")
    expect(second.locator("body")).to_have_attribute("data-state", "closed")
    assert second.evaluate("document.body.dataset.closeCode") == "4009"
    results: dict[str, Any] = first.evaluate("({state: document.body.dataset.state})")
    assert results == {"state": "joined"}


@pytest.mark.parametrize(
    ("flags", "topic", "code", "error"),
    [
        ((), "x" * 257, "4400", "invalid_topic"),
        (("--auth-secret", "s" * 32), "private", "4001", "unauthorized"),
    ],
    ids=["invalid-topic", "unauthorized"],
)
def test_a_join_that_cannot_succeed_shows_why_and_is_not_retried(
    start_server: Callable[..., Server],
    open_page: Callable[[str], Page],
    flags: tuple[str, ...],
    topic: str,
    code: str,
    error: str,
) -> None:
    """A browser only sees a close code, so the server sends the reason in an
    error message first; the page shows it and stays closed."""
    from playwright.sync_api import expect

    server = start_server(*flags)
    page = open_page(f"http://127.0.0.1:{server.port}/#{topic}")
    page.click("#join")
    expect(page.locator("body")).to_have_attribute("data-state", "closed")
    expect(page.locator("#status")).to_contain_text(error)
    assert page.evaluate("document.body.dataset.closeCode") == code
    # The client decided not to reconnect: no retry was scheduled.
    assert page.evaluate("window.demo.client.retryTimer") is None
    assert len(server.wait_records("peer refused", reason=error)) == 1


def test_the_browser_client_resumes_after_its_connection_is_reset(
    server: Server, open_page: Callable[[str], Page]
) -> None:
    """signaling.js asks for a resumable session: after a reset it comes back
    with the same id, gets the offer sent meanwhile, and no one saw it go."""
    with Proxy(server.port) as proxy:
        page = open_page(f"http://127.0.0.1:{server.port}/")
        first = page.evaluate(
            """async (port) => {
                const client = new SignalingClient("browser-resume", {
                    url: `ws://127.0.0.1:${port}`, minDelay: 50, maxDelay: 200,
                });
                window.resumeTest = { client, events: [] };
                client.on("resumed", (e) => window.resumeTest.events.push(`resumed ${e.selfId}`));
                client.on("peer-left", (e) => window.resumeTest.events.push(`left ${e.id}`));
                client.on("offer", (m) => window.resumeTest.events.push(`offer ${m.msgId}`));
                return await client.connect();
            }""",
            proxy.port,
        )
        other, other_id = RawClient.join(server.port, "/ws/browser-resume")
        with other:
            page.wait_for_function("window.resumeTest.client.peers.size === 1")
            proxy.reset()
            server.wait_records("peer suspended", peer=first)
            offer = {"type": "offer", "to": first, "payload": {}, "msgId": "gap"}
            other.send_frame(OP_TEXT, json.dumps(offer).encode())
            page.wait_for_function("window.resumeTest.events.length >= 2")
            events = page.evaluate("window.resumeTest.events")
            assert events == [f"resumed {first}", "offer gap"]
            assert page.evaluate("window.resumeTest.client.selfId") == first
            # The other peer saw nothing: its next message answers its ping.
            other.send_frame(OP_TEXT, b'{"type":"ping","msgId":"p"}')
            assert other.recv_json() == {"type": "pong", "msgId": "p"}
            assert other_id not in events


def test_the_browser_client_broadcasts_and_hears_broadcasts(
    server: Server, open_page: Callable[[str], Page]
) -> None:
    """signaling.js: `broadcast()` reaches a native peer, and a peer's
    broadcast comes as a `broadcast` event, named by its sender."""
    page = open_page(f"http://127.0.0.1:{server.port}/")
    self_id = page.evaluate(
        """async (port) => {
            const client = new SignalingClient("browser-broadcast", {url: `ws://127.0.0.1:${port}`});
            window.broadcastTest = { client, heard: [] };
            client.on("broadcast", (m) => window.broadcastTest.heard.push([m.from, m.payload]));
            return await client.connect();
        }""",
        server.port,
    )
    other, other_id = RawClient.join(server.port, "/ws/browser-broadcast")
    with other:
        page.wait_for_function("window.broadcastTest.client.peers.size === 1")
        page.evaluate("window.broadcastTest.client.broadcast({hi: 1}, 'b1')")
        heard = other.recv_json()
        assert heard == {"type": "broadcast", "from": self_id, "payload": {"hi": 1}, "msgId": "b1"}
        other.send_frame(OP_TEXT, b'{"type":"broadcast","payload":"back"}')
        page.wait_for_function("window.broadcastTest.heard.length === 1")
        assert page.evaluate("window.broadcastTest.heard") == [[other_id, "back"]]


def test_the_demo_page_renames_its_peer(server: Server, open_page: Callable[[str], Page]) -> None:
    """The demo's Rename button sends update-metadata: another peer gets
    peer-updated, and the page shows the other's new name from its own."""
    from playwright.sync_api import expect

    page = open_page(f"http://127.0.0.1:{server.port}/#browser-rename")
    page.fill("#name", "ada")
    self_id = join(page)
    other, other_id = RawClient.join(server.port, "/ws/browser-rename")
    with other:
        page.wait_for_function("window.demo.client.peers.size === 1")
        page.fill("#name", "grace")
        page.click("#rename")
        # The demo also offers a data channel: skip its relays.
        while (message := other.recv_json())["type"] in ("offer", "ice-candidate"):
            pass
        assert message == {"type": "peer-updated", "peerId": self_id, "metadata": {"name": "grace"}}
        renamed = {"type": "update-metadata", "metadata": {"name": "lin"}}
        other.send_frame(OP_TEXT, json.dumps(renamed).encode())
        expect(page.locator("#log")).to_contain_text("is now lin", timeout=TIMEOUT_MS)
        assert page.evaluate(f"window.demo.client.peers.get('{other_id}')") == {"name": "lin"}
