// tricklm chat page: talks to this server's /v1/chat/completions; conversations and settings stay in
// localStorage. Model text is rendered by marked and sanitised by DOMPurify before it touches the DOM.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEYS = { chats: "tricklm-chats", current: "tricklm-current", settings: "tricklm-settings", apiKey: "tricklm-key" };
  const DEFAULTS = { system: "", temperature: 0.7, top_p: 1, max_tokens: 512, stop: [] };
  const MAX_CHATS = 100;
  const MAX_RETRIES = 5;
  const STATUS_TEXT = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
    413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
  };

  const ui = {
    app: document.querySelector(".app"), sidebar: $("sidebar"), backdrop: $("backdrop"), menu: $("menu"),
    list: $("chat-list"), newChat: $("new-chat"), title: $("chat-title"), modelName: $("model-name"),
    dot: $("health-dot"), log: $("log"), empty: $("empty"), notice: $("notice"), noticeText: $("notice-text"),
    composer: $("composer"), msg: $("msg"), send: $("send"), stop: $("stop"), announce: $("announce"),
    settings: $("settings"), settingsForm: $("settings-form"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
  };

  let chats = loadChats();
  let chat = null; // the conversation on screen; kept in `chats` once it has a message
  let settings = loadSettings();
  let modelId = null;
  let turn = null; // the reply being generated: {controller, reply, element, ...}

  // ---------------------------------------------------------------- storage

  function readJson(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value ?? fallback;
    } catch {
      return fallback;
    }
  }

  function writeJson(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (e) {
      showNotice(`Could not save in this browser's storage (${e.name}); delete some conversations.`, "error");
    }
  }

  function loadChats() {
    const list = readJson(KEYS.chats, []);
    return Array.isArray(list) ? list.filter((c) => c && Array.isArray(c.messages)) : [];
  }

  function saveChats() {
    chats.sort((a, b) => b.updated - a.updated);
    chats = chats.slice(0, MAX_CHATS);
    writeJson(KEYS.chats, chats);
  }

  function loadSettings() {
    const saved = readJson(KEYS.settings, {});
    return { ...DEFAULTS, ...(typeof saved === "object" ? saved : {}) };
  }

  // ---------------------------------------------------------------- conversations

  function newChat() {
    return { id: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`, title: "", updated: Date.now(), messages: [] };
  }

  function openChat(target) {
    if (turn) return;
    chat = target;
    localStorage.setItem(KEYS.current, chat.id);
    hideNotice();
    renderAll();
    closeSidebar();
    ui.msg.focus();
  }

  function storeChat() {
    chat.updated = Date.now();
    if (!chat.title) chat.title = titleOf(chat);
    if (!chats.includes(chat)) chats.push(chat);
    saveChats();
    localStorage.setItem(KEYS.current, chat.id);
    renderList();
  }

  function titleOf(c) {
    const first = c.messages.find((m) => m.role === "user");
    const text = first ? first.content.replace(/\s+/g, " ").trim() : "";
    return text.length > 60 ? `${text.slice(0, 57)}…` : text || "New chat";
  }

  function deleteChat(target) {
    if (turn && target === chat) return;
    chats = chats.filter((c) => c !== target);
    saveChats();
    if (target === chat) openChat(newChat());
    else renderList();
  }

  // ---------------------------------------------------------------- rendering

  function renderAll() {
    renderList();
    renderChat();
  }

  function renderList() {
    ui.list.replaceChildren();
    if (!chats.length) {
      const li = document.createElement("li");
      li.className = "none";
      li.textContent = "No conversations yet";
      ui.list.append(li);
    }
    for (const c of chats) ui.list.append(listItem(c));
    ui.title.textContent = chat.messages.length ? chat.title || titleOf(chat) : "New chat";
    document.title = chat.messages.length ? `${ui.title.textContent} · tricklm` : "tricklm";
  }

  function listItem(c) {
    const li = document.createElement("li");
    const open = button(c.title || "New chat", "chat-item", () => openChat(c));
    if (c === chat) {
      li.className = "current";
      open.setAttribute("aria-current", "true");
    }
    const del = button("×", "chat-delete", () => deleteChat(c));
    del.setAttribute("aria-label", `Delete conversation: ${c.title || "New chat"}`);
    li.append(open, del);
    return li;
  }

  function button(label, className, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  }

  function renderChat() {
    ui.log.querySelectorAll(".msg").forEach((el) => el.remove());
    ui.empty.hidden = chat.messages.length > 0;
    chat.messages.forEach((m, i) => ui.log.append(messageElement(m, i)));
    scrollToEnd();
  }

  function messageElement(m, index) {
    const el = document.createElement("article");
    el.className = `msg ${m.role}`;
    el.setAttribute("aria-label", m.role === "user" ? "You" : "Assistant");
    const content = document.createElement("div");
    content.className = "content";
    if (m.role === "user") content.textContent = m.content; // what users type is shown as text, never as HTML
    else renderMarkdown(content, m.content, true);
    const meta = document.createElement("div");
    meta.className = "meta";
    if (m.role === "assistant") el.append(thinkingElement(m));
    el.append(content, meta);
    fillMeta(meta, m, index);
    return el;
  }

  // A thinking model's reasoning: folded away under its summary, shown as the plain text it is
  function thinkingElement(m) {
    const details = document.createElement("details");
    details.className = "thinking";
    details.hidden = !m.reasoning;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const text = document.createElement("div");
    text.className = "reasoning";
    text.textContent = m.reasoning || "";
    details.append(summary, text);
    return details;
  }

  function fillMeta(meta, m, index) {
    meta.replaceChildren();
    if (m.role === "assistant") {
      const mark = finishMark(m.finish);
      if (mark) meta.append(mark);
      const numbers = document.createElement("span");
      numbers.className = "numbers";
      numbers.textContent = describeNumbers(m.numbers);
      meta.append(numbers);
    }
    if (index !== undefined) meta.append(actions(m, index));
  }

  function finishMark(finish) {
    const text = { stopped: "Stopped", length: "Cut at the token limit" }[finish];
    if (!text) return null;
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = text;
    mark.title = finish === "length" ? "The reply reached max tokens (Settings) or the context window" : "You stopped this reply";
    return mark;
  }

  function actions(m, index) {
    const box = document.createElement("span");
    box.className = "actions";
    const copy = button("Copy", "action", () => copyText(m.content, copy));
    copy.setAttribute("aria-label", m.role === "user" ? "Copy your message" : "Copy the reply");
    box.append(copy);
    const last = index === chat.messages.length - 1;
    if (m.role === "assistant" && last) box.append(button("Regenerate", "action", regenerate));
    const lastUser = chat.messages.findLastIndex((x) => x.role === "user");
    if (m.role === "user" && index === lastUser) box.append(button("Edit", "action", () => startEdit(index)));
    return box;
  }

  function describeNumbers(n) {
    if (!n) return "";
    const parts = [];
    if (n.tokens != null) parts.push(`${n.tokens} tokens`);
    if (n.tps != null) parts.push(`${n.tps.toFixed(1)} tok/s`);
    if (n.ttft != null) parts.push(`first token ${formatMs(n.ttft)}`);
    if (n.prompt != null) parts.push(`prompt ${n.prompt} tokens, ${n.cached ?? 0} cached`);
    if (n.tokens == null && n.elapsed != null) parts.push(`${(n.elapsed / 1000).toFixed(1)} s`);
    return parts.join(" · ");
  }

  function formatMs(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  // Model output is markdown: rendered by marked (raw HTML escaped), then sanitised all the same, so no
  // HTML, script or javascript: link from it ever runs
  const PURIFY = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "video", "audio", "picture", "source"],
    FORBID_ATTR: ["style", "id", "name"],
  };

  function setupSanitizer() {
    // Classes from the model could restyle the page; only marked's code-language ones are kept
    DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
      if (data.attrName === "class") data.keepAttr = node.nodeName === "CODE" && /^language-[\w+#.-]+$/.test(data.attrValue);
    });
    // Raw HTML in a reply is shown as the text it is, like any other characters the model wrote
    // A single line break stays one (a poem's lines), as chat pages show replies
    marked.use({ gfm: true, breaks: true, renderer: { html: ({ text }) => escapeHtml(text) } });
  }

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  function renderMarkdown(el, text, final) {
    el.innerHTML = DOMPurify.sanitize(marked.parse(text), PURIFY);
    for (const a of el.querySelectorAll("a[href]")) {
      a.target = "_blank";
      a.rel = "noopener noreferrer";
    }
    if (final) el.querySelectorAll("pre > code").forEach(decorateCode);
  }

  function decorateCode(code) {
    const pre = code.parentElement;
    const language = (code.className.match(/language-([\w+#.-]+)/) || [])[1] || "";
    const source = code.textContent;
    highlight(code, language, source);
    const box = document.createElement("div");
    box.className = "code";
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.textContent = language || "code";
    const copy = button("Copy code", "action", () => copyText(source, copy));
    head.append(label, copy);
    pre.replaceWith(box);
    box.append(head, pre);
  }

  function highlight(code, language, source) {
    if (typeof hljs === "undefined" || source.length > 20000) return;
    const known = language && hljs.getLanguage(language);
    const result = known ? hljs.highlight(source, { language, ignoreIllegals: true }) : hljs.highlightAuto(source);
    code.innerHTML = result.value; // hljs escapes the source: its output is spans around text
    code.classList.add("hljs");
  }

  async function copyText(text, btn) {
    const done = await writeClipboard(text);
    const label = btn.textContent;
    btn.textContent = done ? "Copied" : "Copy failed";
    setTimeout(() => { btn.textContent = label; }, 1500);
  }

  async function writeClipboard(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Plain http on a LAN address has no clipboard API: fall back to a selected textarea
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "visually-hidden";
      document.body.append(area);
      area.select();
      const ok = document.execCommand("copy");
      area.remove();
      return ok;
    }
  }

  // The view follows the reply unless the reader has scrolled up to read something else
  function nearBottom() {
    const log = ui.log;
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }

  function scrollToEnd() {
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  // ---------------------------------------------------------------- notices

  function showNotice(text, kind = "info") {
    ui.noticeText.textContent = text;
    ui.notice.className = `notice ${kind}`;
    ui.notice.setAttribute("role", kind === "error" ? "alert" : "status");
    ui.notice.hidden = false;
  }

  function hideNotice() {
    ui.notice.hidden = true;
    ui.noticeText.textContent = "";
  }

  // ---------------------------------------------------------------- HTTP

  class ApiError extends Error {}

  function authHeaders() {
    const key = sessionStorage.getItem(KEYS.apiKey);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function call(url, options = {}) {
    try {
      return await fetch(url, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`Cannot reach the server at ${location.host}: is tricklm still running? (${e.message})`);
    }
  }

  // An error answer in plain words: OpenAI's JSON error, a proxy's HTML page or any other text
  async function describeFailure(res) {
    const status = `${res.status} ${res.statusText || STATUS_TEXT[res.status] || ""}`.trim();
    const text = await res.text().catch(() => "");
    const type = res.headers.get("content-type") || "";
    if (type.includes("html") || /^\s*</.test(text)) {
      let title = new DOMParser().parseFromString(text, "text/html").title.trim();
      if (title.includes(String(res.status))) title = ""; // "502 Bad Gateway" says nothing new
      return `The server answered ${status} with a web page instead of an API reply (often a proxy in front of tricklm)${title ? `: “${title}”` : "."}`;
    }
    let message = text.trim().slice(0, 300);
    try {
      const body = JSON.parse(text);
      message = body?.error?.message || body?.detail || message;
    } catch { /* not JSON: the text itself */ }
    return `The server answered ${status}${message ? `: ${message}` : "."}`;
  }

  function retryDelay(res) {
    const header = res.headers.get("retry-after");
    const seconds = Number(header);
    if (header && Number.isFinite(seconds)) return Math.min(Math.max(Math.ceil(seconds), 1), 120);
    const date = Date.parse(header || "");
    if (Number.isFinite(date)) return Math.min(Math.max(Math.ceil((date - Date.now()) / 1000), 1), 120);
    return 2;
  }

  function countdown(seconds, signal) {
    return new Promise((resolve, reject) => {
      let left = seconds;
      const tick = () => {
        if (left <= 0) {
          clearInterval(timer);
          hideNotice();
          resolve();
          return;
        }
        showNotice(`The server is busy (429): retrying in ${left} s…`, "info");
        left -= 1;
      };
      const timer = setInterval(tick, 1000);
      tick();
      signal.addEventListener("abort", () => {
        clearInterval(timer);
        hideNotice();
        reject(new DOMException("stopped", "AbortError"));
      }, { once: true });
    });
  }

  async function postChat(body, signal) {
    let askedKey = false;
    for (let attempt = 0; ; attempt++) {
      const started = performance.now();
      const res = await call("/v1/chat/completions", {
        method: "POST", signal, body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
      });
      if (res.ok) return { res, started };
      if (res.status === 429 && attempt < MAX_RETRIES) {
        await countdown(retryDelay(res), signal);
        continue;
      }
      if (res.status === 401 && !askedKey) {
        askedKey = true;
        if (await askForKey()) continue;
      }
      throw new ApiError(await describeFailure(res));
    }
  }

  function askForKey() {
    return new Promise((resolve) => {
      const input = $("key-input");
      input.value = "";
      ui.keyDialog.returnValue = "";
      ui.keyDialog.addEventListener("close", () => {
        const key = input.value.trim();
        const ok = ui.keyDialog.returnValue === "ok" && key.length > 0;
        if (ok) {
          sessionStorage.setItem(KEYS.apiKey, key);
          loadModel();
        }
        resolve(ok);
      }, { once: true });
      ui.keyDialog.showModal();
    });
  }

  // ---------------------------------------------------------------- a turn: request, stream, finish

  function requestBody() {
    const messages = chat.messages
      .filter((m) => m.content !== "")
      .map((m) => ({ role: m.role, content: m.content }));
    if (settings.system.trim()) messages.unshift({ role: "system", content: settings.system });
    const body = {
      messages, stream: true, stream_options: { include_usage: true },
      temperature: settings.temperature, top_p: settings.top_p, max_tokens: settings.max_tokens,
    };
    if (modelId) body.model = modelId;
    if (settings.stop.length) body.stop = settings.stop;
    return body;
  }

  async function submit(text) {
    if (turn || !text.trim()) return;
    const snapshot = chat.messages.slice();
    chat.messages.push({ role: "user", content: text });
    ui.msg.value = "";
    autosize();
    await respond(snapshot, text);
  }

  function regenerate() {
    if (turn) return;
    const snapshot = chat.messages.slice();
    if (chat.messages.at(-1)?.role === "assistant") chat.messages.pop();
    respond(snapshot, "");
  }

  // Runs one reply. On failure the conversation goes back to `snapshot` (failed turns are never sent
  // again) and `draft`, the user's words, goes back into the message box.
  async function respond(snapshot, draft) {
    hideNotice();
    const reply = { role: "assistant", content: "", reasoning: "", finish: null, numbers: null };
    const body = requestBody();
    chat.messages.push(reply);
    renderChat();
    turn = startTurn(reply);
    try {
      const { res, started } = await postChat(body, turn.controller.signal);
      turn.started = started;
      await readStream(res, turn);
      finishTurn(turn);
    } catch (e) {
      failTurn(turn, e, snapshot, draft);
    } finally {
      endTurn();
    }
  }

  function startTurn(reply) {
    const element = ui.log.querySelector(".msg:last-of-type");
    element.classList.add("streaming");
    const t = {
      reply, element, content: element.querySelector(".content"), meta: element.querySelector(".meta"),
      thinking: element.querySelector(".thinking"),
      controller: new AbortController(), started: performance.now(), first: null, usage: null, finish: null,
      pending: false,
    };
    t.content.innerHTML = '<span class="waiting">Waiting for the server…</span>';
    t.timer = setInterval(() => showLiveNumbers(t), 250);
    setBusy(true);
    return t;
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.composer.setAttribute("aria-busy", String(busy));
    ui.newChat.disabled = busy;
  }

  // SSE over fetch: events end with a blank line; `data: [DONE]` ends the stream
  async function readStream(res, t) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (e.name === "AbortError") throw e;
        throw new ApiError("The connection dropped before the reply finished.");
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (onEvent(event, t)) return;
      }
    }
    if (!t.finish) throw new ApiError("The connection dropped before the reply finished.");
  }

  // Returns true at [DONE]
  function onEvent(event, t) {
    const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
    if (!data) return false; // a keep-alive comment
    if (data === "[DONE]") return true;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(`The server stopped the reply: ${chunk.error.message || "unknown error"}`);
    if (chunk.usage) t.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const thought = choice.delta?.reasoning_content || "";
      if (thought) addThought(t, thought);
      const piece = choice.delta?.content || "";
      if (piece) addText(t, piece);
      if (choice.finish_reason) t.finish = choice.finish_reason;
    }
    return false;
  }

  function addText(t, piece) {
    if (t.first === null) t.first = performance.now();
    t.reply.content += piece;
    if (t.pending) return;
    t.pending = true;
    // Markdown is re-rendered at most once a frame, however fast tokens arrive
    requestAnimationFrame(() => {
      t.pending = false;
      if (turn !== t) return;
      const follow = nearBottom();
      renderMarkdown(t.content, t.reply.content, false);
      if (follow) scrollToEnd();
    });
  }

  function addThought(t, piece) {
    if (t.first === null) t.first = performance.now();
    t.reply.reasoning += piece;
    t.thinking.hidden = false;
    t.thinking.querySelector("summary").textContent = "Thinking…";
    t.thinking.querySelector(".reasoning").textContent = t.reply.reasoning;
  }

  function showLiveNumbers(t) {
    const now = performance.now();
    const n = { elapsed: now - t.started };
    if (t.first !== null) n.ttft = t.first - t.started;
    t.reply.numbers = n;
    fillMeta(t.meta, t.reply);
  }

  function finishTurn(t) {
    t.thinking.querySelector("summary").textContent = "Thinking";
    t.reply.finish = t.finish;
    t.reply.numbers = finalNumbers(t);
    storeChat();
    announce(t.reply);
  }

  // tok/s counts the tokens after the first over the time after it: the decode speed, not the queue
  function finalNumbers(t) {
    const end = performance.now();
    const n = { elapsed: end - t.started };
    if (t.first !== null) n.ttft = t.first - t.started;
    const u = t.usage;
    if (u) {
      n.tokens = u.completion_tokens;
      n.prompt = u.prompt_tokens;
      n.cached = u.prompt_tokens_details?.cached_tokens ?? 0;
      const seconds = t.first !== null ? (end - t.first) / 1000 : 0;
      if (u.completion_tokens > 1 && seconds > 0) n.tps = (u.completion_tokens - 1) / seconds;
    }
    return n;
  }

  function failTurn(t, error, snapshot, draft) {
    const stopped = error.name === "AbortError";
    if (stopped && t.reply.content) {
      // A stopped reply is kept (and sent with the next turn), marked as stopped
      t.reply.finish = "stopped";
      t.reply.numbers = { elapsed: performance.now() - t.started, ttft: t.first !== null ? t.first - t.started : null };
      storeChat();
      announce(t.reply);
      return;
    }
    chat.messages = snapshot;
    if (draft && !ui.msg.value) {
      ui.msg.value = draft;
      autosize();
    }
    if (stopped) showNotice("Stopped before the reply began.", "info");
    else showNotice(error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`, "error");
    if (!stopped && !(error instanceof ApiError)) console.warn(error);
  }

  function endTurn() {
    clearInterval(turn.timer);
    turn = null;
    setBusy(false);
    renderAll();
    ui.msg.focus();
  }

  function announce(reply) {
    const mark = { stopped: " (stopped)", length: " (cut at the token limit)" }[reply.finish] || "";
    ui.announce.textContent = `Reply${mark}: ${reply.content}`;
  }

  function stop() {
    if (turn) turn.controller.abort();
  }

  // ---------------------------------------------------------------- editing the last user message

  function startEdit(index) {
    if (turn) return;
    const el = ui.log.querySelectorAll(".msg")[index];
    const box = document.createElement("div");
    box.className = "edit-box";
    const area = document.createElement("textarea");
    area.value = chat.messages[index].content;
    area.setAttribute("aria-label", "Edit your message");
    const buttons = document.createElement("div");
    buttons.className = "dialog-buttons";
    const save = () => resend(index, area.value);
    buttons.append(button("Cancel", "secondary", renderChat), button("Send", "primary", save));
    area.addEventListener("keydown", (e) => {
      if (isSendKey(e)) { e.preventDefault(); save(); }
      if (e.key === "Escape") { e.preventDefault(); renderChat(); ui.msg.focus(); }
    });
    box.append(area, buttons);
    el.replaceChildren(box);
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }

  function resend(index, text) {
    if (turn || !text.trim()) return;
    const snapshot = chat.messages.slice();
    chat.messages = chat.messages.slice(0, index);
    chat.messages.push({ role: "user", content: text });
    respond(snapshot, text);
  }

  // ---------------------------------------------------------------- settings

  function openSettings() {
    $("set-system").value = settings.system;
    $("set-temperature").value = settings.temperature;
    $("set-top-p").value = settings.top_p;
    $("set-max-tokens").value = settings.max_tokens;
    $("set-stop").value = settings.stop.join("\n");
    $("settings-error").textContent = "";
    ui.settings.showModal();
  }

  function readSettingsForm() {
    const form = ui.settingsForm;
    const invalid = [...form.querySelectorAll("input")].find((i) => !i.checkValidity());
    if (invalid) {
      const label = form.querySelector(`label[for="${invalid.id}"]`).textContent;
      throw new Error(`${label}: ${invalid.validationMessage}`);
    }
    const stop = $("set-stop").value.split("\n").filter((s) => s !== "");
    if (stop.length > 4) throw new Error("Stop sequences: at most 4.");
    return {
      system: $("set-system").value,
      temperature: Number($("set-temperature").value),
      top_p: Number($("set-top-p").value),
      max_tokens: Number($("set-max-tokens").value),
      stop,
    };
  }

  function saveSettings(event) {
    event.preventDefault();
    try {
      settings = readSettingsForm();
    } catch (e) {
      $("settings-error").textContent = e.message;
      return;
    }
    writeJson(KEYS.settings, settings);
    ui.settings.close();
  }

  function resetSettings() {
    settings = { ...DEFAULTS };
    writeJson(KEYS.settings, settings);
    openSettings();
  }

  // ---------------------------------------------------------------- server status

  async function loadModel() {
    try {
      const res = await call("/v1/models");
      if (res.status === 401) {
        setModel("API key needed", "loading");
        return;
      }
      if (!res.ok) throw new ApiError(await describeFailure(res));
      const body = await res.json();
      // The first model that writes text (a server may also serve embedding and reranking models)
      modelId = body.data?.find((m) => !m.task || m.task === "generate")?.id ?? null;
      setModel(modelId || "no model", modelId ? "ready" : "down");
    } catch {
      setModel("not reachable", "down");
    }
  }

  async function checkHealth() {
    let state = "down";
    try {
      const res = await fetch("/health", { cache: "no-store" });
      state = res.ok ? "ready" : "loading";
    } catch { /* unreachable */ }
    if (state === "ready" && !modelId) await loadModel();
    else if (state !== "ready") setModel(state === "loading" ? "model loading…" : "server not reachable", state);
    else ui.dot.className = "dot ready";
  }

  function setModel(text, state) {
    ui.modelName.textContent = text;
    ui.dot.className = `dot ${state}`;
  }

  // ---------------------------------------------------------------- input and wiring

  function isSendKey(e) {
    return e.key === "Enter" && !e.shiftKey && !e.isComposing && !e.altKey && !e.ctrlKey && !e.metaKey;
  }

  function autosize() {
    ui.msg.style.height = "auto";
    ui.msg.style.height = `${Math.min(ui.msg.scrollHeight, window.innerHeight * 0.4)}px`;
  }

  function toggleSidebar(open) {
    ui.sidebar.classList.toggle("open", open);
    ui.backdrop.hidden = !open;
    ui.menu.setAttribute("aria-expanded", String(open));
    if (open) ui.newChat.focus();
  }

  function closeSidebar() {
    if (ui.sidebar.classList.contains("open")) toggleSidebar(false);
  }

  function wire() {
    ui.composer.addEventListener("submit", (e) => {
      e.preventDefault();
      submit(ui.msg.value);
    });
    ui.msg.addEventListener("keydown", (e) => {
      if (isSendKey(e)) {
        e.preventDefault();
        submit(ui.msg.value);
      }
    });
    ui.msg.addEventListener("input", autosize);
    ui.stop.addEventListener("click", () => { stop(); ui.msg.focus(); });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && turn && !ui.settings.open && !ui.keyDialog.open) stop();
      if (e.key === "Escape") closeSidebar();
    });
    ui.newChat.addEventListener("click", () => openChat(newChat()));
    ui.menu.addEventListener("click", () => toggleSidebar(!ui.sidebar.classList.contains("open")));
    ui.backdrop.addEventListener("click", closeSidebar);
    $("notice-close").addEventListener("click", hideNotice);
    document.querySelectorAll(".suggestion").forEach((b) => b.addEventListener("click", () => submit(b.textContent)));
    $("open-settings").addEventListener("click", openSettings);
    ui.settingsForm.addEventListener("submit", saveSettings);
    $("settings-cancel").addEventListener("click", () => ui.settings.close());
    $("settings-reset").addEventListener("click", resetSettings);
    ui.keyForm.addEventListener("submit", (e) => { e.preventDefault(); ui.keyDialog.close("ok"); });
    $("key-cancel").addEventListener("click", () => ui.keyDialog.close(""));
    window.addEventListener("storage", (e) => { if (e.key === KEYS.chats && !turn) syncFromOtherTab(); });
  }

  // Another tab saved: take its list, keep showing the same conversation
  function syncFromOtherTab() {
    chats = loadChats();
    chat = chats.find((c) => c.id === chat.id) || chat;
    renderAll();
  }

  function start() {
    setupSanitizer();
    const current = localStorage.getItem(KEYS.current);
    chat = chats.find((c) => c.id === current) || newChat();
    wire();
    renderAll();
    ui.msg.focus();
    checkHealth();
    setInterval(checkHealth, 10000);
  }

  start();
})();
