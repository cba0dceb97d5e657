// The page of `localpers serve` (localpers/serve/page.py): chat, memory, jobs. Plain JavaScript, no build step.
// Security: every text the server holds is shown with textContent (never parsed as HTML); the API key typed by the
// person stays in this tab's sessionStorage and goes in the Authorization header, never in a URL; requests go to
// this origin only, state-changing ones as JSON.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "localpers.key", USER_STORE = "localpers.user";
const SHOWN_ITEMS = 100;  // history items listed at once (a search finds the others)
const state = {
  user: null,
  key: sessionStorage.getItem(KEY_STORE),
  conversation: [],        // the messages of this conversation, as sent to /v1/chat/completions
  snapshot: null,          // the last GET /v1/users/{user}/memory
  watching: new Map(),     // fact id -> the "noted: ..." line under the message that stated it
  timer: null,
  asking: null,            // the pending API key question, if any
  shownFacts: null,        // what renderFacts last showed (re-rendered only when it changes)
  sending: false,
};

// ---------------------------------------------------------------- small helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("aria-") || name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : ""; }
function seconds(s) { return s == null ? "—" : s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`; }
function statusClass(status) { return "status " + status.replace(" ", "-"); }
function factLabel(fact) { return fact.value || fact.text; }

function notify(message, isError = false) {
  const notice = $("notice");
  notice.textContent = message;
  notice.className = isError ? "error" : "";
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ---------------------------------------------------------------- the API

async function api(method, path, body) {
  const headers = {};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "omit", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    await askKey(state.key ? "The server refused that key. Type it again." : null);
    return api(method, path, body);
  }
  return response;
}

async function json(method, path, body) {
  const response = await api(method, path, body);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = data.error && data.error.message ? data.error.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, message);
  }
  return data;
}

function userPath(path = "") { return `/v1/users/${encodeURIComponent(state.user)}${path}`; }

// ---------------------------------------------------------------- dialogs

function askKey(why) {
  // one question at a time: requests refused meanwhile wait for the same answer
  if (state.asking) return state.asking;
  state.asking = new Promise((resolve) => {
    const dialog = $("key-dialog");
    if (why) $("key-why").textContent = why;
    $("api-key").value = "";
    dialog.oncancel = (event) => event.preventDefault();  // nothing works without it
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      state.key = $("api-key").value.trim();
      sessionStorage.setItem(KEY_STORE, state.key);
      dialog.close();
      state.asking = null;
      resolve();
    };
    dialog.showModal();
  });
  return state.asking;
}

async function personRefused(name) {
  // The server's own user-id rule (store.check_user): the error it gives a read of that person's memory, or null
  try {
    await json("GET", `/v1/users/${encodeURIComponent(name)}/memory`);
  } catch (error) {
    if (error.status === 400) return error.message;
  }
  return null;
}

function askPerson(suggested, why = "") {
  return new Promise((resolve) => {
    const dialog = $("person-dialog");
    $("person").value = suggested || state.user || "";
    $("person-error").textContent = why;
    dialog.oncancel = (event) => { if (!state.user) event.preventDefault(); };  // Escape keeps the current person
    $("person-form").onsubmit = async (event) => {
      event.preventDefault();
      const name = $("person").value.trim();
      if (!name) return;
      const refused = await personRefused(name);
      $("person-error").textContent = refused ? `That name cannot be used: ${refused}` : "";
      if (refused) { $("person").focus(); return; }
      dialog.close();
      resolve(name);
    };
    dialog.showModal();
  });
}

async function choosePerson(name) {
  state.user = name;
  localStorage.setItem(USER_STORE, name);
  $("who").textContent = `Chatting as ${name}`;
  newConversation();
  state.watching.clear();
  await refresh();
  await loadItems();
}

// ---------------------------------------------------------------- tabs (arrow keys move between them)

function selectTab(tab, focus = false) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  if (tab.id === "tab-memory") loadItems();
}

function onTabKey(event) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const i = tabs.indexOf(document.activeElement);
  const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (i < 0 || next === undefined) return;
  event.preventDefault();
  selectTab(tabs[(next + tabs.length) % tabs.length], true);
}

// ---------------------------------------------------------------- chat

function addMessage(role, text) {
  const item = el("li", { class: `msg ${role}` }, el("span", { class: "role" }, role === "user" ? "You" : "Assistant"),
                  el("span", { class: "text" }, text));
  $("messages").append(item);
  return item;
}

function newConversation() {
  state.conversation = [];
  $("messages").replaceChildren();
  $("chat-input").focus();
}

async function readStream(response, onText) {
  // OpenAI's SSE chunks; the explanation comes in a last chunk without choices (localpers: {explain: true})
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", explanation = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        if (chunk.localpers) explanation = chunk.localpers;
        for (const choice of chunk.choices || []) if (choice.delta && choice.delta.content) onText(choice.delta.content);
      }
    }
  }
  return explanation;
}

async function send(text) {
  if (state.sending) return;
  state.sending = true;
  $("send").disabled = true;
  const known = new Set((state.snapshot ? state.snapshot.facts : []).map((fact) => fact.id));
  const mine = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  reply.setAttribute("aria-busy", "true");  // read out once complete, not token by token
  const replyText = reply.querySelector(".text");
  state.conversation.push({ role: "user", content: text });
  let content = "";
  try {
    const maxTokens = parseInt($("max-tokens").value, 10) || 256;
    const response = await api("POST", "/v1/chat/completions", {
      messages: state.conversation, user: state.user, stream: true, max_tokens: maxTokens,
      localpers: { explain: true },
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new ApiError(response.status, data.error ? data.error.message : `HTTP ${response.status}`);
    }
    const explanation = await readStream(response, (piece) => { content += piece; replyText.textContent = content; });
    state.conversation.push({ role: "assistant", content });
    reply.classList.remove("streaming");
    reply.removeAttribute("aria-busy");
    await explain(mine, reply, known, explanation);
  } catch (error) {
    state.conversation.pop();  // the unanswered message: not part of the conversation sent next
    reply.remove();
    mine.append(el("span", { class: "noted" }, "not answered"));
    notify(`The message was not answered: ${error.message}`, true);
  } finally {
    state.sending = false;
    $("send").disabled = false;
  }
}

async function explain(mine, reply, known, explanation) {
  // after a reply: the facts its message stated (watched until learned) and its why panel
  try {
    await refresh();
    for (const fact of state.snapshot.facts.filter((f) => !known.has(f.id))) {
      const line = el("span", { class: "noted", "data-fact": String(fact.id) });
      mine.append(line);
      state.watching.set(fact.id, line);
    }
    updateNoted();
    if (explanation) reply.append(await whyPanel(explanation));
  } catch (error) {
    notify(`The reply came, but not what shaped it: ${error.message}`, true);
  }
}

function updateNoted() {
  const facts = new Map((state.snapshot ? state.snapshot.facts : []).map((fact) => [fact.id, fact]));
  for (const [id, line] of state.watching) {
    const fact = facts.get(id);
    if (!fact) { line.textContent = "noted, then deleted"; continue; }
    const what = { "in use": "in use", learning: "learning…", failed: `not learned: ${fact.reason}`,
                   stored: "stored" }[fact.status] || fact.status;
    line.textContent = `noted: ${factLabel(fact)} — ${what}`;
  }
}

async function whyPanel(explanation) {
  // What shaped the reply: the server gives ids; the texts come from this user's memory, read now.
  let items = [];
  try { items = (await json("GET", userPath("/memories"))).data; } catch (error) { if (error.status !== 404) throw error; }
  const text = new Map(items.map((item) => [item.id, item.text]));
  const artifacts = new Map((state.snapshot ? state.snapshot.artifacts : []).map((a) => [a.id, a]));
  const factsUsed = new Map();
  const adapters = explanation.artifacts.map((a) => {
    const known = artifacts.get(a.id);
    for (const source of known ? known.sources : []) factsUsed.set(source, "in the adapter");
    return el("li", {}, `${a.method} ${a.kind} #${a.id}` + (known ? `, made ${when(known.created)}` : ""));
  });
  for (const id of explanation.stated || []) if (!factsUsed.has(id)) factsUsed.set(id, "in a line before your question");
  if (explanation.composition.split("+").includes("prompt")) {
    for (const item of items) if (item.kind === "preference" && !factsUsed.has(item.id)) factsUsed.set(item.id, "in the prompt");
  }
  const list = (nodes, none) => (nodes.length ? el("ul", {}, ...nodes) : none);
  const retrieved = explanation.retrieved.map((id) => el("li", {}, text.has(id) ? text.get(id) : `item ${id} (deleted since)`));
  const facts = [...factsUsed].map(([id, how]) => el("li", {}, `${text.has(id) ? text.get(id) : `fact ${id}`} (${how})`));
  return el("details", { class: "why" }, el("summary", {}, "Why this reply?"),
    el("dl", {},
      el("dt", {}, "Composition"), el("dd", {}, explanation.composition),
      el("dt", {}, "Adapters"), el("dd", {}, list(adapters, "none: the base model")),
      el("dt", {}, "Facts used"), el("dd", {}, list(facts, "none")),
      el("dt", {}, "Retrieved from your history"), el("dd", {}, list(retrieved, "nothing"))));
}

// ---------------------------------------------------------------- memory and jobs (polled while a job is pending)

async function refresh() {
  clearTimeout(state.timer);
  if (!state.user) return;
  try {
    state.snapshot = await json("GET", userPath("/memory"));
  } catch (error) {
    if (error.status !== 404) { notify(`Could not read the memory: ${error.message}`, true); }
    state.snapshot = { user: state.user, facts: [], artifacts: [], jobs: [], items: 0 };
  }
  const facts = JSON.stringify([state.snapshot.facts, state.snapshot.artifacts]);
  if (facts !== state.shownFacts) { state.shownFacts = facts; renderFacts(); }  // keeps keyboard focus when nothing changed
  renderJobs();
  updateNoted();
  const busy = state.snapshot.jobs.some((job) => job.state === "queued" || job.state === "running");
  state.timer = setTimeout(refresh, busy ? 1000 : 5000);
}

function renderFacts() {
  const { facts, artifacts } = state.snapshot;
  $("facts-empty").textContent = facts.length ? "" : `Nothing is known about ${state.user} yet: say something about yourself in the chat.`;
  $("facts").replaceChildren(...facts.map(factCard));
  $("adapters").replaceChildren(...(artifacts.length ? artifacts.map((a) => el("li", {},
    `${a.method} ${a.kind} #${a.id}, made ${when(a.created)} from ${a.sources.length} fact(s)` +
    (a.broken ? ` — cannot be loaded: ${a.broken}` : ""))) : [el("li", {}, "none: replies come from the base model")]));
}

function factCard(fact) {
  const title = el("span", {},
    ...(fact.attribute ? [el("span", { class: "attribute" }, `${fact.attribute}: `)] : []),
    el("span", { class: "value" }, factLabel(fact)),
    el("span", { class: statusClass(fact.status) }, fact.status));
  const origin = fact.source ? `from your message “${fact.source.text}”, ${when(fact.source.ts)}` : `stated ${when(fact.ts)}`;
  const corrected = fact.source && fact.source.corrected ? `corrected by you ${when(fact.source.ts)}: “${fact.source.text}”`
    : fact.meta.edited ? `corrected by you ${when(fact.ts)}; first learned ${origin}` : origin;
  const details = [el("div", { class: "meta" }, corrected)];
  if (fact.reason) details.push(el("div", { class: "meta reason" }, `why: ${fact.reason}`));
  const edit = el("button", { type: "button", "aria-label": `Edit the fact: ${fact.text}` }, "Edit");
  const remove = el("button", { type: "button", class: "danger", "aria-label": `Delete the fact: ${fact.text}` }, "Delete");
  const card = el("li", { "data-id": String(fact.id), class: "fact" }, title, ...details, el("div", { class: "row" }, edit, remove));
  edit.onclick = () => editFact(card, fact);
  remove.onclick = () => act(async () => {
    const position = [...$("facts").children].indexOf(card);
    await json("DELETE", userPath(`/memories/${fact.id}`));
    notify(`Deleted “${fact.text}”: the adapters made from it are retired.`);
    await refresh();
    focusAfterDelete("facts", position);
  });
  return card;
}

function focusAfterDelete(list, position) {
  // keyboard focus goes to the card that took the deleted one's place (the next), else the list's heading
  const next = $(list).children[position];
  const target = next ? next.querySelector("button") : $(`${list}-title`);
  if (target) target.focus();
}

function editFact(card, fact) {
  const id = `edit-${fact.id}`;
  const input = el("input", { id, value: fact.text, required: true });
  const form = el("form", { class: "row" }, el("label", { htmlFor: id }, "Correct the fact"), input,
                  el("button", { type: "submit" }, "Save"), el("button", { type: "button", class: "secondary" }, "Cancel"));
  const cancel = () => {
    renderFacts();
    refresh();
    const again = $("facts").querySelector(`li[data-id="${fact.id}"] button`);
    if (again) again.focus();  // back on the fact's Edit button
  };
  form.querySelector(".secondary").onclick = cancel;
  form.addEventListener("keydown", (event) => {
    if (event.key === "Escape") { event.preventDefault(); cancel(); }
  });
  form.onsubmit = (event) => {
    event.preventDefault();
    act(async () => {
      await json("PATCH", userPath(`/memories/${fact.id}`), { text: input.value });
      notify(`Corrected to “${input.value}”: it is being learned again.`);
      await refresh();
    });
  };
  clearTimeout(state.timer);  // no re-render under the person's typing
  card.replaceChildren(form);
  input.focus();
}

function jobChanges(job) {
  if (job.state === "failed") return job.reason || "failed";
  const r = job.result || {};
  const parts = [];
  if (r.artifact) parts.push(`made adapter #${r.artifact}`);
  if (r.edited) parts.push(`${r.edited} fact(s) edited in`);
  if (r.failed) parts.push(`${r.failed} fact(s) could not be edited`);
  if (r.retired) parts.push(`retired ${r.retired} adapter(s)`);
  if (r.superseded_by) parts.push(`done by ${r.superseded_by}`);
  for (const [k, v] of Object.entries(r)) {
    if (!["artifact", "edited", "failed", "retired", "superseded_by"].includes(k)) parts.push(`${k}: ${JSON.stringify(v)}`);
  }
  if (!parts.length) return job.state === "done" ? "nothing to change" : "";
  return parts.join(", ");
}

function renderJobs() {
  const { jobs } = state.snapshot;
  $("jobs-empty").textContent = jobs.length ? "" : "No background job has run for you.";
  $("jobs").querySelector("tbody").replaceChildren(...jobs.map((job) => el("tr", { "data-id": String(job.id) },
    el("td", {}, `#${job.id}`), el("td", {}, job.kind),
    el("td", { class: `state-${job.state}` }, job.state),
    el("td", {}, job.state === "queued" ? `queued ${when(job.created)}${job.position ? `, #${job.position} in line` : ""}` : seconds(job.duration_s)),
    el("td", {}, jobChanges(job)))));
}

async function loadItems() {
  if (!state.user) return;
  const query = $("search").value.trim();
  let items = [];
  try {
    items = query
      ? (await json("GET", userPath(`/memories/search?q=${encodeURIComponent(query)}&k=50`))).data
      : (await json("GET", userPath("/memories"))).data.reverse();
  } catch (error) {
    if (error.status !== 404) notify(`Could not read the history: ${error.message}`, true);
  }
  items = items.filter((item) => item.kind !== "preference");
  const all = items.length;
  items = items.slice(0, SHOWN_ITEMS);
  $("items-empty").textContent = !all ? (query ? `Nothing in your history matches “${query}”.` : "Your history is empty.")
    : all > SHOWN_ITEMS ? `The newest ${SHOWN_ITEMS} of ${all} items; search to find others.` : "";
  $("items").replaceChildren(...items.map((item) => {
    const remove = el("button", { type: "button", class: "danger", "aria-label": `Delete: ${item.text}` }, "Delete");
    remove.onclick = () => act(async () => {
      const position = [...$("items").children].findIndex((li) => li.dataset.id === String(item.id));
      await json("DELETE", userPath(`/memories/${item.id}`));
      notify("Deleted from your history (with what was learned from it).");
      await refresh();
      await loadItems();
      focusAfterDelete("items", position);
    });
    return el("li", { "data-id": String(item.id) }, el("div", {}, item.text),
              el("div", { class: "meta" }, `${item.kind}, ${when(item.ts)}`), el("div", { class: "row" }, remove));
  }));
}

async function act(work) {
  try { await work(); } catch (error) { notify(error.message, true); }
}

async function exportData() {
  const data = await json("GET", userPath("/export"));
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const link = el("a", { href: url, download: `localpers-${state.user}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  notify("Downloaded everything held about you.");
}

function forget() {
  const dialog = $("forget-dialog");
  $("forget-name").textContent = state.user;
  $("forget-cancel").onclick = () => dialog.close();
  $("forget-form").onsubmit = (event) => {
    event.preventDefault();
    dialog.close();
    act(async () => {
      await json("DELETE", userPath(""));
      state.watching.clear();
      newConversation();
      notify(`Everything about ${state.user} is forgotten.`);
      await refresh();
      await loadItems();
    });
  };
  dialog.showModal();
}

// ---------------------------------------------------------------- start

async function start() {
  $("tabs").addEventListener("keydown", onTabKey);
  for (const tab of document.querySelectorAll('[role="tab"]')) tab.onclick = () => selectTab(tab);
  $("chat-form").onsubmit = (event) => {
    event.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || state.sending) return;
    $("chat-input").value = "";
    send(text);
  };
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("new-chat").onclick = newConversation;
  $("change-person").onclick = async () => {
    const name = await askPerson();
    if (name !== state.user) await choosePerson(name);
  };
  $("search-form").onsubmit = (event) => { event.preventDefault(); loadItems(); };
  $("export").onclick = () => act(exportData);
  $("forget").onclick = forget;
  let owner = null;
  try { owner = (await json("GET", "/v1/page")).owner; } catch (error) { notify(error.message, true); }
  let name = localStorage.getItem(USER_STORE) || owner;
  const refused = name && await personRefused(name);  // a name remembered from before the page checked it
  if (!name || refused) name = await askPerson(refused ? "" : name, refused ? `That name cannot be used: ${refused}` : "");
  await choosePerson(name);
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
