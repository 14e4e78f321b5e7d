"""The chat page at `/` in real Chromium (Debian's package, driven by Playwright), against live servers.

The main flows run on the default model; failures a live server cannot easily produce (a proxy's HTML
page, a 429, a dropped stream) and the exact markdown to render come from `page.route`. Chromium is
installed by `make install`: when it is missing these tests fail, unless TRICKLM_SKIP_BROWSER=1.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Request, Route, expect, sync_playwright

from tricklm.config import ServerConfig
from tricklm.engine.engine import Engine
from tricklm.server.app import create_app
from tricklm.server.testing import running_server

CHROMIUM = os.environ.get("TRICKLM_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(os.environ.get("TRICKLM_SKIP_BROWSER") == "1", reason="TRICKLM_SKIP_BROWSER=1")

# Greedy and short unless a test says otherwise: fast, and the same reply every time
FAST_SETTINGS = {"temperature": 0, "max_tokens": 8}
SEED_SETTINGS = f"""
if (!localStorage.getItem("tricklm-settings")) localStorage.setItem("tricklm-settings", '{json.dumps(FAST_SETTINGS)}');
"""
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
KEY = "browser-test-key-123"
# What Chromium itself logs for every non-2xx answer: expected where a test provokes one
FAILED_LOAD = "Failed to load resource"

expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `make install` installs Debian's chromium (apt-get install chromium); "
            "set TRICKLM_SKIP_BROWSER=1 to skip the browser tests"
        )
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


class ChatPage:
    """One tab on the chat page, with the request bodies it posted and the console errors it logged."""

    def __init__(self, context: BrowserContext, base: str) -> None:
        self.context = context
        self.base = base
        self.page = context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.expected_errors: tuple[str, ...] = ()
        self.bodies: list[dict[str, Any]] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", self._record)

    def _record(self, request: Request) -> None:
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            self.bodies.append(json.loads(request.post_data or "{}"))

    def open(self, model: str | None = None, **settings: Any) -> None:
        self.page.goto(self.base + "/")
        if settings:
            self.page.evaluate(
                "s => localStorage.setItem('tricklm-settings', JSON.stringify(s))", {**FAST_SETTINGS, **settings}
            )
            self.page.reload()
        if model is not None:
            expect(self.page.locator("#model-name")).to_have_text(model)

    def send(self, text: str) -> None:
        self.page.locator("#msg").fill(text)
        self.page.locator("#msg").press("Enter")

    def wait_done(self) -> Locator:
        """The last message once no reply is running."""
        expect(self.page.locator("#send")).to_be_visible()
        expect(self.page.locator(".msg.streaming")).to_have_count(0)
        return self.page.locator(".msg").last

    def reply(self, text: str) -> Locator:
        self.send(text)
        last = self.wait_done()
        expect(last).to_have_class(re.compile(r"\bassistant\b"))
        return last

    def notice(self) -> Locator:
        return self.page.locator("#notice")

    def stored_chats(self) -> list[dict[str, Any]]:
        return list(self.page.evaluate("() => JSON.parse(localStorage.getItem('tricklm-chats') || '[]')"))

    def check_console(self) -> None:
        unexpected = [e for e in self.errors if not any(x in e for x in self.expected_errors)]
        assert not unexpected, f"console errors: {unexpected}"


def new_chat_page(browser: Browser, base: str, **context_options: Any) -> ChatPage:
    context = browser.new_context(**{"viewport": DESKTOP, **context_options})
    context.add_init_script(SEED_SETTINGS)
    return ChatPage(context, base)


@pytest.fixture(scope="module")
def model_name(default_server: str) -> str:
    return str(httpx.get(default_server + "/v1/models").json()["data"][0]["id"])


@pytest.fixture
def chat(browser: Browser, default_server: str) -> Iterator[ChatPage]:
    page = new_chat_page(browser, default_server)
    yield page
    page.context.close()
    page.check_console()


def sse(pieces: list[str], finish: str | None = "stop", done: bool = True, reasoning: tuple[str, ...] = ()) -> str:
    """A chat stream as the server sends it: role, reasoning and content deltas, finish reason, usage, [DONE]."""
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    events: list[dict[str, Any]] = [{"choices": [{**choice, "delta": {"role": "assistant"}}]}]
    events += [{"choices": [{**choice, "delta": {"reasoning_content": piece}}]} for piece in reasoning]
    events += [{"choices": [{**choice, "delta": {"content": piece}}]} for piece in pieces]
    if finish is not None:
        events.append({"choices": [{**choice, "delta": {}, "finish_reason": finish}]})
        usage = {"prompt_tokens": 9, "completion_tokens": len(pieces), "total_tokens": 9 + len(pieces)}
        events.append({"choices": [], "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 0}}})
    body = "".join(f"data: {json.dumps({'object': 'chat.completion.chunk', **e})}\n\n" for e in events)
    return body + ("data: [DONE]\n\n" if done else "")


def fulfil_stream(pieces: list[str], **kwargs: Any) -> Callable[[Route], None]:
    def handle(route: Route) -> None:
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=sse(pieces, **kwargs))

    return handle


# ---- chat basics on the real model ----------------------------------------------------------------------

RECORD_GROWTH = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const c = document.querySelector(".msg.streaming .content");
    if (c && !c.querySelector(".waiting")) window.__lengths.push(c.textContent.length);
  }).observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
}"""


NUMBERS = re.compile(r"^\d+ tokens · [\d.]+ tok/s · first token [\d.]+ m?s · prompt \d+ tokens, \d+ cached$")


def test_enter_sends_and_the_reply_streams_in_with_its_numbers(chat: ChatPage, model_name: str) -> None:
    # The page renders once an animation frame: 24 tokens (under 0.1 s on an EPYC) could all land in one
    # or two frames of a browser starved by the rest of the suite; 96 take long enough to be seen growing
    chat.open(model=model_name, max_tokens=96)
    box = chat.page.locator("#msg")
    box.fill("Hello")
    box.press("Shift+Enter")
    box.press_sequentially("there")
    assert box.input_value() == "Hello\nthere"  # Shift+Enter adds a line and sends nothing
    expect(chat.page.locator(".msg")).to_have_count(0)
    chat.page.evaluate(RECORD_GROWTH)
    reply = chat.reply("Tell me about the city of Paris.")
    user = chat.page.locator(".msg.user")
    expect(user).to_have_text(re.compile("Tell me about the city of Paris."))
    lengths = chat.page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"the reply did not grow as it streamed: {lengths}"
    numbers = reply.locator(".numbers")
    expect(numbers).to_have_text(NUMBERS)
    said = chat.stored_chats()[0]["messages"][1]["content"]
    announced = re.compile(r"^Reply( \(cut at the token limit\))?: " + re.escape(said))
    expect(chat.page.locator("#announce")).to_have_text(announced)  # the live region reads the whole reply
    expect(chat.page.locator("#chat-title")).to_have_text("Tell me about the city of Paris.")
    expect(chat.page.locator("#chat-list .chat-item")).to_have_text(["Tell me about the city of Paris."])
    log = chat.page.locator("#log")
    assert log.evaluate("l => l.scrollHeight - l.scrollTop - l.clientHeight") < 2  # the view followed the reply
    assert chat.bodies[0]["stream_options"] == {"include_usage": True} and chat.bodies[0]["model"] == model_name


def test_history_is_sent_and_the_next_turn_reports_cached_tokens(chat: ChatPage) -> None:
    chat.open()
    chat.reply("What is the capital of France?")
    second = chat.reply("And of Italy?")
    first_reply = chat.stored_chats()[0]["messages"][1]["content"]
    assert first_reply
    assert chat.bodies[1]["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "And of Italy?"},
    ]
    cached = re.search(r"(\d+) cached", second.locator(".numbers").inner_text())
    assert cached is not None and int(cached.group(1)) > 0  # the first turn was found in the prefix cache


def running_requests(base: str) -> float:
    text = httpx.get(base + "/metrics").text
    found = re.search(r"^tricklm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    assert found is not None
    return float(found.group(1))


def test_stop_marks_the_reply_and_frees_the_request_on_the_server(chat: ChatPage, default_server: str) -> None:
    chat.open(max_tokens=400)
    chat.send("Write a long story about a dragon who learns to bake bread.")
    chat.page.wait_for_function("() => document.querySelector('.msg.streaming .content')?.textContent.length > 40")
    assert running_requests(default_server) == 1
    chat.page.locator("#stop").click()
    reply = chat.wait_done()
    expect(reply.locator(".mark")).to_have_text("Stopped")
    deadline = time.monotonic() + 10
    while running_requests(default_server) != 0:
        assert time.monotonic() < deadline, "the stopped request still runs on the server"
        time.sleep(0.05)
    chat.page.reload()  # a stopped reply is kept, with its mark
    expect(chat.page.locator(".msg.assistant .mark")).to_have_text("Stopped")
    stored = chat.stored_chats()[0]["messages"][1]
    assert stored["finish"] == "stopped" and len(stored["content"]) > 40


def test_settings_persist_and_a_reply_cut_by_max_tokens_is_marked(chat: ChatPage) -> None:
    chat.open()
    page = chat.page
    page.locator("#open-settings").click()
    expect(page.locator("#settings")).to_be_visible()
    page.locator("#set-temperature").fill("5")
    page.locator("#settings button[type=submit]").click()
    expect(page.locator("#settings-error")).to_contain_text("Temperature")  # out of range: not saved
    page.locator("#set-temperature").fill("0")
    page.locator("#set-system").fill("You are a terse assistant.")
    page.locator("#set-max-tokens").fill("5")
    page.locator("#set-stop").fill("###")
    page.locator("#settings button[type=submit]").click()
    expect(page.locator("#settings")).to_be_hidden()
    page.reload()
    page.locator("#open-settings").click()
    expect(page.locator("#set-max-tokens")).to_have_value("5")
    expect(page.locator("#set-system")).to_have_value("You are a terse assistant.")
    expect(page.locator("#set-stop")).to_have_value("###")
    page.locator("#settings-cancel").click()
    reply = chat.reply("Count from one to twenty in words.")
    expect(reply.locator(".mark")).to_have_text("Cut at the token limit")
    expect(reply.locator(".numbers")).to_contain_text("5 tokens")
    body = chat.bodies[-1]
    assert body["max_tokens"] == 5 and body["temperature"] == 0 and body["stop"] == ["###"]
    assert body["messages"][0] == {"role": "system", "content": "You are a terse assistant."}


def test_new_chat_conversations_survive_a_reload_and_can_be_switched(chat: ChatPage) -> None:
    chat.open()
    page = chat.page
    chat.reply("Say hello.")
    page.locator("#new-chat").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#chat-title")).to_have_text("New chat")
    chat.reply("Say goodbye.")
    assert chat.bodies[-1]["messages"] == [{"role": "user", "content": "Say goodbye."}]  # a new chat starts empty
    page.reload()
    items = page.locator("#chat-list .chat-item")
    expect(items).to_have_text(["Say goodbye.", "Say hello."])
    expect(page.locator("#chat-list .chat-item[aria-current=true]")).to_have_text("Say goodbye.")
    expect(page.locator(".msg.user .content")).to_have_text("Say goodbye.")
    items.nth(1).click()
    expect(page.locator(".msg.user .content")).to_have_text("Say hello.")
    expect(page.locator(".msg")).to_have_count(2)
    page.get_by_role("button", name="Delete conversation: Say goodbye.").click()
    expect(items).to_have_text(["Say hello."])
    assert [c["title"] for c in chat.stored_chats()] == ["Say hello."]


def test_regenerate_and_edit_and_resend_replace_the_last_turn(chat: ChatPage) -> None:
    chat.open(max_tokens=6)
    page = chat.page
    chat.reply("Name a color.")
    page.get_by_role("button", name="Regenerate").click()
    chat.wait_done()
    expect(page.locator(".msg")).to_have_count(2)
    assert chat.bodies[-1]["messages"] == [{"role": "user", "content": "Name a color."}]
    page.get_by_role("button", name="Edit").click()
    editor = page.get_by_role("textbox", name="Edit your message")
    expect(editor).to_have_value("Name a color.")
    editor.fill("Name a fruit.")
    editor.press("Enter")
    chat.wait_done()
    expect(page.locator(".msg.user .content")).to_have_text("Name a fruit.")
    expect(page.locator(".msg")).to_have_count(2)
    assert chat.bodies[-1]["messages"] == [{"role": "user", "content": "Name a fruit."}]
    stored = chat.stored_chats()[0]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[0]["content"] == "Name a fruit."


# ---- rendering: markdown yes, HTML and javascript: never ---------------------------------------------------

HOSTILE_REPLY = [
    "# Title\n\nSome **bold** text and `inline code`.\n\n",
    "```python\nprint('hi')\n```\n\n",
    "<img src=x onerror=\"window.__xss='img'\"><script>window.__xss='script'</script>\n\n",
    "[click me](javascript:window.__xss='link') and <a href=\"javascript:window.__xss='a'\">raw link</a>\n\n",
    '<p style="position:fixed;inset:0" class="msg" id="msg">styled</p>',
]


def test_markdown_renders_and_html_from_the_model_or_the_user_never_runs(chat: ChatPage) -> None:
    chat.context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat.open()
    page = chat.page
    page.route("**/v1/chat/completions", fulfil_stream(HOSTILE_REPLY))
    reply = chat.reply("<img src=x onerror=\"window.__xss='user'\"> [a](javascript:window.__xss='user-link')")
    content = reply.locator(".content")
    expect(content.locator("h1")).to_have_text("Title")
    expect(content.locator("strong")).to_have_text("bold")
    code = content.locator(".code pre code.hljs")
    expect(code).to_have_text("print('hi')\n")
    assert code.locator("span").count() > 0  # highlighted
    expect(content.locator(".code-head")).to_contain_text("python")
    for link in ("click me", "raw link"):
        anchor = content.get_by_text(link)
        assert not (anchor.get_attribute("href") or "").lower().startswith("javascript")
        anchor.click()
    user = page.locator(".msg.user .content")
    expect(user).to_have_text("<img src=x onerror=\"window.__xss='user'\"> [a](javascript:window.__xss='user-link')")
    assert user.locator("a, img").count() == 0  # what users type is text
    assert page.locator(".msg img, .msg script, .msg [style], .msg [id], .content p.msg").count() == 0
    expect(content).to_contain_text("<img src=x onerror=")  # the model's HTML shows as the text it is
    assert page.evaluate("window.__xss") is None
    content.get_by_role("button", name="Copy code").click()
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"
    reply.get_by_role("button", name="Copy the reply").click()
    assert page.evaluate("navigator.clipboard.readText()") == "".join(HOSTILE_REPLY)


def test_reasoning_is_folded_away_and_single_line_breaks_stay(chat: ChatPage) -> None:
    chat.open()
    thoughts = ("The user wants", " a haiku.\nThree lines.")
    chat.page.route("**/v1/chat/completions", fulfil_stream(["Line A\nLine B", "\nLine C"], reasoning=thoughts))
    reply = chat.reply("A haiku, please")
    thinking = reply.locator("details.thinking")
    expect(thinking).to_be_visible()
    assert thinking.get_attribute("open") is None  # folded until the reader opens it
    expect(thinking.locator("summary")).to_have_text("Thinking")
    thinking.locator("summary").click()
    expect(thinking.locator(".reasoning")).to_have_text("".join(thoughts))
    content = reply.locator(".content")
    expect(content.locator("br")).to_have_count(2)  # three lines, not one
    expect(content).not_to_contain_text("The user wants")
    # The reasoning is kept with the chat, and not sent back as the answer
    chat.send("Another")
    chat.wait_done()
    sent = chat.bodies[-1]["messages"]
    assert [m["content"] for m in sent if m["role"] == "assistant"] == ["Line A\nLine B\nLine C"]


# ---- errors: plain words, the status, and the failed turn is not kept --------------------------------------

PROXY_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"
LOADING = {"error": {"message": "the model is still loading", "type": "server_error", "code": "not_ready"}}


def html_502(route: Route) -> None:
    route.fulfill(status=502, headers={"content-type": "text/html"}, body=PROXY_PAGE)


def json_503(route: Route) -> None:
    route.fulfill(status=503, headers={"content-type": "application/json"}, body=json.dumps(LOADING))


def refused(route: Route) -> None:
    route.abort("connectionrefused")


def error_event(route: Route) -> None:
    body = sse(["Partial "], finish=None, done=False)
    failure = {"error": {"message": "generation failed in the engine", "code": "engine_error"}}
    body += f"data: {json.dumps(failure)}\n\ndata: [DONE]\n\n"
    route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)


FAILURES: list[tuple[Callable[[Route], None], list[str]]] = [
    (html_502, ["502 Bad Gateway", "web page", "proxy"]),
    (json_503, ["503 Service Unavailable", "the model is still loading"]),
    (refused, ["Cannot reach the server"]),
    (fulfil_stream(["Partial "], finish=None, done=False), ["connection dropped"]),
    (error_event, ["stopped the reply", "generation failed in the engine"]),
]


def test_errors_are_shown_in_plain_words_and_failed_turns_are_not_kept(chat: ChatPage) -> None:
    chat.expected_errors = (FAILED_LOAD,)
    chat.open()
    page = chat.page
    for handler, words in FAILURES:
        page.route("**/v1/chat/completions", handler)
        chat.send("Hello there")
        chat.wait_done()
        for word in words:
            expect(chat.notice()).to_contain_text(word)
        expect(chat.notice()).to_have_class(re.compile(r"\berror\b"))
        expect(page.locator(".msg")).to_have_count(0)  # the failed turn is gone
        expect(page.locator("#msg")).to_have_value("Hello there")  # and the words are back in the box
        page.unroute("**/v1/chat/completions")
    page.locator("#msg").press("Enter")
    chat.wait_done()
    expect(chat.notice()).to_be_hidden()
    assert chat.bodies[-1]["messages"] == [{"role": "user", "content": "Hello there"}]
    assert [m["role"] for m in chat.stored_chats()[0]["messages"]] == ["user", "assistant"]


def test_a_busy_server_is_retried_after_retry_after_with_a_countdown(chat: ChatPage) -> None:
    chat.expected_errors = (FAILED_LOAD,)
    chat.open()
    page = chat.page
    answered: list[float] = []

    def busy_once(route: Route) -> None:
        answered.append(time.monotonic())
        if len(answered) > 1:
            route.continue_()
            return
        error = {"error": {"message": "the server is busy: 256 requests are waiting", "type": "server_error"}}
        headers = {"content-type": "application/json", "retry-after": "2"}
        route.fulfill(status=429, headers=headers, body=json.dumps(error))

    page.route("**/v1/chat/completions", busy_once)
    chat.send("Hello")
    expect(chat.notice()).to_contain_text("busy (429): retrying in 2 s")
    expect(chat.notice()).to_contain_text("retrying in 1 s")
    reply = chat.wait_done()
    expect(reply.locator(".numbers")).to_contain_text("tokens")
    expect(chat.notice()).to_be_hidden()
    assert len(answered) == 2 and answered[1] - answered[0] >= 1.8


def test_a_server_that_went_away_is_named(browser: Browser, default_engine: Engine, model_name: str) -> None:
    with running_server(create_app(engine=default_engine)) as base:
        chat = new_chat_page(browser, base)
        chat.open(model=model_name)
    chat.expected_errors = (FAILED_LOAD,)
    chat.send("Anyone there?")
    chat.wait_done()
    expect(chat.notice()).to_contain_text("Cannot reach the server")
    expect(chat.page.locator(".msg")).to_have_count(0)
    chat.context.close()
    chat.check_console()


def test_a_server_with_an_api_key_asks_for_it_once(browser: Browser, default_engine: Engine, model_name: str) -> None:
    with running_server(create_app(ServerConfig(api_keys=(KEY,)), engine=default_engine)) as base:
        for path in ("/static/app.js", "/static/vendor/marked.umd.js", "/favicon.ico", "/"):
            assert httpx.get(base + path).status_code == 200, path  # the page and its files need no key
        assert httpx.get(base + "/v1/models").status_code == 401
        chat = new_chat_page(browser, base)
        chat.expected_errors = (FAILED_LOAD,)
        chat.open()
        expect(chat.page.locator("#model-name")).to_have_text("API key needed")
        chat.send("Hi")
        dialog = chat.page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        dialog.get_by_label("API key").fill(KEY)
        dialog.get_by_role("button", name="Use this key").click()
        chat.wait_done()
        expect(chat.page.locator(".msg.assistant .numbers")).to_contain_text("tokens")
        expect(chat.page.locator("#model-name")).to_have_text(model_name)
        assert chat.notice().is_hidden()
        chat.context.close()
    chat.check_console()


# ---- the page itself: phone, keyboard, favicon, policy ------------------------------------------------------

LONG_REPLY = [f"Paragraph {i}: " + "words that wrap across the narrow screen " * 6 + "\n\n" for i in range(12)] + [
    "```text\n" + "a_very_long_line_without_spaces_" * 12 + "\n```\n\n| a | b |\n|---|---|\n| " + "x" * 200 + " | y |\n"
]

SMALL_TARGETS = """() => [...document.querySelectorAll("button, a, textarea, input")]
  .filter((e) => e.checkVisibility({ visibilityProperty: true }) && !e.classList.contains("skip"))
  .filter((e) => !e.closest(".content") || e.tagName === "BUTTON")
  .map((e) => [e.textContent.trim() || e.id || e.className, e.getBoundingClientRect()])
  .filter(([, r]) => r.width < 44 || r.height < 44)
  .map(([name, r]) => `${name} ${Math.round(r.width)}x${Math.round(r.height)}`)"""


def test_phone_viewport_keeps_the_composer_on_screen_without_sideways_scroll(
    browser: Browser, default_server: str
) -> None:
    chat = new_chat_page(browser, default_server, viewport=PHONE, is_mobile=True, has_touch=True)
    chat.open()
    page = chat.page
    page.route("**/v1/chat/completions", fulfil_stream(LONG_REPLY))
    chat.reply("Write a lot.")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    font = page.locator("#msg").evaluate("e => parseFloat(getComputedStyle(e).fontSize)")
    assert font >= 16  # below 16 px, phones zoom into the box on focus
    composer = page.locator("#composer").bounding_box()
    assert composer is not None and composer["y"] >= 0 and composer["y"] + composer["height"] <= PHONE["height"]
    log = page.locator("#log")
    assert log.evaluate("l => l.scrollHeight - l.scrollTop - l.clientHeight") < 2
    page.locator(".msg.assistant .content").evaluate("c => c.lastElementChild.scrollIntoView()")
    assert page.evaluate(SMALL_TARGETS) == []
    page.get_by_role("button", name="Conversations").click()
    expect(page.locator("#new-chat")).to_be_in_viewport()
    assert page.evaluate(SMALL_TARGETS) == []
    expect(page.locator("#chat-list .chat-item")).to_have_text(["Write a lot."])
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    chat.context.close()
    chat.check_console()


FOCUSED = """() => {
  const e = document.activeElement, s = getComputedStyle(e);
  const text = e.textContent.trim();
  return { id: e.id, tag: e.tagName, text, outline: s.outlineStyle, width: parseFloat(s.outlineWidth) };
}"""


def test_keyboard_only_use_with_visible_focus(chat: ChatPage) -> None:
    chat.open()
    page = chat.page
    page.evaluate("document.activeElement.blur()")
    for _ in range(30):
        page.keyboard.press("Tab")
        focused = page.evaluate(FOCUSED)
        if focused["id"] == "msg":
            break
        if focused["tag"] == "BODY":  # focus left the page for the browser's own controls
            continue
        assert focused["outline"] != "none" and focused["width"] >= 2, f"no visible focus on {focused}"
    else:
        pytest.fail("Tab never reached the message box")
    page.keyboard.type("Say hi.")
    page.keyboard.press("Enter")
    chat.wait_done()
    expect(page.locator(".msg.assistant .numbers")).to_contain_text("tokens")
    assert page.evaluate(FOCUSED)["id"] == "msg"  # ready for the next message
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(FOCUSED)["text"] == "Regenerate"
    page.keyboard.press("Enter")
    chat.wait_done()
    assert len(chat.bodies) == 2 and page.evaluate(FOCUSED)["id"] == "msg"


def test_favicon_static_files_and_a_strict_page_policy(default_server: str) -> None:
    icon = httpx.get(default_server + "/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    policy = httpx.get(default_server + "/").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    for name in ("marked.LICENSE", "dompurify.LICENSE", "highlight.LICENSE", "VERSIONS.md"):
        assert httpx.get(f"{default_server}/static/vendor/{name}").status_code == 200, name
    assert httpx.get(default_server + "/static/%2e%2e/app.py").status_code == 404
