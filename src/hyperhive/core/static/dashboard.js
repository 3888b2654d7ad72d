// The dashboard, live. It keeps the hive's state in memory, keyed by id (the first page
// of the pending approvals and open questions, the newest messages, the agents, the egress
// rules and log), applies each event of the stream (the changed row itself, summarised)
// to it and redraws the section it touched; /api/state is read once at load and again
// after the stream reconnects. Everything an agent wrote goes in through textContent only,
// and through visible() (or visibleJson()) first. Long agent text comes cut (a row's
// `truncated` names each cut field with its full length); "show all" reads the one row.
(function () {
  "use strict";
  // display.js (beside hyperhive/display.py, served with this script) defines them.
  var visible = window.hiveDisplay.visible, visibleJson = window.hiveDisplay.visibleJson;
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var ACTIONS = ["start", "stop", "restart", "pause", "resume", "interrupt", "destroy"];
  var PAGE = 50, MESSAGES_SHOWN = 50;
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = visible(text);
    if (cls) e.className = cls;
    return e;
  }
  function toast(text, bad) {
    var t = el("div", text, "toast" + (bad ? " bad" : ""));
    document.getElementById("toasts").appendChild(t);
    setTimeout(function () { t.remove(); }, 4000);
  }
  function post(url, data) {
    var body = new URLSearchParams(data || {});
    return fetch(url, { method: "POST", body: body, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" } })
      .then(function (r) { return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || r.status); return j; }); });
  }
  function state(a) {
    if (a.failed) return "failed";
    if (a.needs_login) return "needs-login";
    if (!a.running) return "stopped";
    return a.paused ? "paused" : "running";
  }
  function form(action, fields, buttons) {
    var f = el("form"); f.method = "post"; f.action = action; f.className = "inline";
    fields.forEach(function (n) { var i = el("input"); i.name = n; i.placeholder = n; f.appendChild(i); });
    buttons.forEach(function (b) { var x = el("button", b[1]); if (b[0]) { x.name = "answer"; x.value = visible(b[0]); } f.appendChild(x); });
    return f;
  }
  function clock(at) {  // wire times are RFC 3339 UTC ("2026-09-07T12:34:56Z"); shown as UTC
    if (at === null || at === undefined) return "";
    var d = new Date(typeof at === "number" ? at * 1000 : at);
    return isNaN(d.getTime()) ? "" : d.toISOString().slice(11, 19);
  }
  function destination(e) {
    if (e.host === "-" || !e.port) return String(e.host);
    return String(e.host).indexOf(":") >= 0 ? "[" + e.host + "]:" + e.port : e.host + ":" + e.port;
  }
  function hidden(name, value) {
    var i = el("input"); i.type = "hidden"; i.name = name; i.value = value; return i;
  }
  // The egress log, newest first: from /api/state, and each decision (and its close,
  // the same id again) as it arrives on the stream.
  var egressLog = [];
  var EGRESS_SHOWN = 100;
  function mergeEgress(fresh) {
    var byId = {};
    egressLog.forEach(function (e) { byId[e.id] = e; });
    fresh.forEach(function (e) {
      var old = byId[e.id];
      if (!old || !old.closed_at || e.closed_at) byId[e.id] = e;  // a closed entry is never un-closed
    });
    egressLog = Object.keys(byId).map(function (k) { return byId[k]; })
      .sort(function (a, b) { return b.id - a.id; }).slice(0, EGRESS_SHOWN);
  }
  function renderEgressLog() {
    var tbody = document.querySelector("#egress-log tbody");
    tbody.replaceChildren();
    egressLog.forEach(function (e) {
      var tr = el("tr", null, "entry " + (e.allowed ? "allowed" : "refused"));
      tr.dataset.id = e.id; tr.dataset.agent = e.agent;
      if (e.unreadable) {
        tr.className = "entry unreadable";
        var td = el("td", "decision " + e.id + " is unreadable: " + visible(e.unreadable)); td.colSpan = 8;
        tr.appendChild(td); tbody.appendChild(tr);
        return;
      }
      var open = e.allowed && !e.closed_at;
      tr.append(el("td", clock(e.at)), el("td", e.agent, "agent"), el("td", destination(e), "destination"),
        el("td", e.address || "", "address"), el("td", e.allowed ? "allowed" : "refused", "decision"),
        el("td", e.reason, "reason"), el("td", open ? "open" : e.bytes_up, "up"),
        el("td", open ? "open" : e.bytes_down, "down"));
      tbody.appendChild(tr);
    });
  }
  function renderRules(s) {
    var tbody = document.querySelector("#egress-rules tbody");
    tbody.replaceChildren();
    s.agents.forEach(function (a) {
      var rules = s.rules[a.name] || [];
      if (!rules.length) {
        var none = el("tr", null, "no-rules"); none.dataset.agent = a.name;
        var td = el("td", "no rules: reaches nothing", "none"); td.colSpan = 4;
        none.append(el("td", a.name), td);
        tbody.appendChild(none);
        return;
      }
      rules.forEach(function (r) {
        var tr = el("tr", null, "rule-row"); tr.dataset.agent = a.name; tr.dataset.rule = r.rule;
        var rule = el("td", null, "rule"); rule.appendChild(el("code", r.rule));
        var f = el("form"); f.method = "post"; f.className = "inline egress-remove";
        f.action = "/api/agents/" + encodeURIComponent(a.name) + "/egress/remove";
        f.append(hidden("csrf_token", csrf), hidden("rule", r.rule), el("button", "remove"));
        var cell = el("td"); cell.appendChild(f);
        tr.append(el("td", a.name), rule, el("td", r.source, "source"), el("td", clock(r.added_at)), cell);
        tbody.appendChild(tr);
      });
    });
  }
  // -- the state, in memory ---------------------------------------------------------
  function listing() { return { rows: {}, total: 0, more: false, after: 0, back: [] }; }
  var S = { agents: [], rules: {}, approvals: listing(), questions: listing(), messages: [] };
  function ordered(rows) {
    return Object.keys(rows).map(function (k) { return rows[k]; })
      .sort(function (a, b) { return a.id - b.id; });
  }
  function takePage(L, page, rows) {
    L.rows = {};
    rows.forEach(function (r) { L.rows[r.id] = r; });
    L.total = page.total; L.more = page.more;
  }
  // A row of a listing changed: opened (a new one, or one the page already has, again) or
  // closed (answered, resolved). A new row joins the page only if it fits at its end.
  function changed(L, row, open) {
    var had = Object.prototype.hasOwnProperty.call(L.rows, row.id);
    if (!open) {
      if (had) delete L.rows[row.id];
      L.total = Math.max(0, L.total - 1);
      return;
    }
    if (had) { L.rows[row.id] = row; return; }
    L.total += 1;
    if (row.id > L.after && !L.more && Object.keys(L.rows).length < PAGE) L.rows[row.id] = row;
    else if (row.id > L.after) L.more = true;
  }
  function takeState(s) {
    S.agents = s.agents;
    S.rules = s.egress_rules;
    takePage(S.approvals, { total: s.approvals_total, more: s.approvals_more }, s.approvals);
    S.approvals.after = 0; S.approvals.back = [];
    takePage(S.questions, { total: s.questions_total, more: s.questions_more }, s.questions);
    S.questions.after = 0; S.questions.back = [];
    S.messages = s.messages;
    mergeEgress(s.egress_log);  // merged, not replaced: a decision may have come in after this state
    ["agents", "approvals", "questions", "messages", "rules", "log"].forEach(redraw);
  }
  var dirty = {}, drawing = null;  // an agent can write fast: redraw at most ten times a second
  function redraw(what) {
    dirty[what] = true;
    if (drawing) return;
    drawing = setTimeout(function () {
      drawing = null;
      var d = dirty; dirty = {};
      if (d.agents) renderAgents();
      if (d.approvals) renderApprovals();
      if (d.questions) renderQuestions();
      if (d.messages) renderMessages();
      if (d.rules || d.agents) renderRules(S);
      if (d.log) renderEgressLog();
    }, 100);
  }
  // -- drawing ----------------------------------------------------------------------
  // What a listing cut: a marker with the full length, and a button that reads the row whole.
  function cutNote(parent, row, field, kind) {
    var full = row.truncated && row.truncated[field];
    if (!full) return;
    parent.append(" ", el("span", "… [cut: " + full + " bytes in all]", "cut"));
    var b = el("button", "show all", "show-all"); b.type = "button";
    b.dataset.kind = kind; b.dataset.id = row.id;
    parent.append(" ", b);
  }
  function pager(list, L) {
    var nav = document.getElementById(list + "-pager"); nav.replaceChildren();
    document.getElementById(list + "-count").textContent = L.total;
    var rows = ordered(L.rows);
    if (!L.after && !L.more) return;
    var first = L.back.length * PAGE + 1;
    if (rows.length) nav.append(el("span", first + "–" + (first + rows.length - 1) + " of " + L.total, "page-info"));
    [["first", L.after > 0], ["previous", L.after > 0], ["next", L.more]].forEach(function (p) {
      var b = el("button", p[0]); b.type = "button"; b.dataset.page = p[0]; b.dataset.list = list;
      b.disabled = !p[1]; nav.append(" ", b);
    });
  }
  function renderAgents() {
    var tbody = document.querySelector("#agents tbody");
    tbody.replaceChildren();
    S.agents.forEach(function (a) {
      var tr = el("tr"); tr.dataset.name = a.name;
      var link = el("a", a.name); link.href = "/agent/" + encodeURIComponent(a.name) + "/";
      var td = el("td"); td.appendChild(link); tr.appendChild(td);
      tr.appendChild(el("td", state(a), "state"));
      tr.appendChild(el("td", a.parent || ""));
      tr.appendChild(el("td", a.status_text || "", "status-text"));
      var acts = el("td", null, "actions");
      ACTIONS.forEach(function (act) {
        var b = el("button", act); b.dataset.action = act; b.dataset.name = a.name;
        if (act === "stop" || act === "destroy") b.dataset.confirm = "1";
        acts.appendChild(b);
      });
      tr.appendChild(acts);
      tbody.appendChild(tr);
    });
    document.getElementById("agent-count").textContent = S.agents.length;
  }
  function renderApprovals() {
    var ul = document.getElementById("approvals"); ul.replaceChildren();
    ordered(S.approvals.rows).forEach(function (a) {
      var li = el("li"); li.dataset.id = a.id;
      if (a.unreadable) {  // a stored row the hive can't read: it can only be denied
        li.className = "unreadable";
        li.append("approval " + a.id + " is unreadable: " + visible(a.unreadable));
        li.appendChild(form("/deny/" + a.id, ["note"], [[null, "deny"]]));
        ul.appendChild(li);
        return;
      }
      li.append(el("b", a.agent), " ", el("span", a.kind, "kind"), " ", el("span", a.description, "description"));
      cutNote(li, a, "description", "approvals");
      if (a.allows) {
        var grant = el("p", "approving will ", "grant");
        var what = el("b", "allow egress to "); what.appendChild(el("code", a.allows, "allows"));
        grant.append(what, visible(" for " + a.agent));
        li.appendChild(grant);
      }
      if (a.grants) {  // a spawn's child, worked out from the whole payload (never cut)
        var spawns = el("p", "approving will ", "grant"), what2 = el("b", "spawn ");
        what2.appendChild(el("code", a.grants, "grants")); spawns.appendChild(what2); li.appendChild(spawns);
      }
      var cutPayload = a.truncated && a.truncated.payload;
      // A cut payload is the first characters of its canonical JSON, as text.
      var payload = a.payload === undefined ? null : a.payload;  // a null payload is left out
      li.appendChild(el("pre", cutPayload ? visible(payload) : visibleJson(payload), "payload"));
      if (cutPayload) {
        var p = el("p", "the payload is cut: see it whole before approving", "payload-cut");
        cutNote(p, a, "payload", "approvals");
        li.appendChild(p);
      }
      li.appendChild(el("code", "sha256 " + a.payload_sha256, "sha"));
      li.appendChild(form("/approve/" + a.id, [], [[null, "approve"]]));
      li.appendChild(form("/deny/" + a.id, ["note"], [[null, "deny"]]));
      ul.appendChild(li);
    });
    pager("approvals", S.approvals);
  }
  function renderQuestions() {
    var qs = document.getElementById("questions"); qs.replaceChildren();
    ordered(S.questions.rows).forEach(function (q) {
      var li = el("li"); li.dataset.id = q.id;
      if (q.unreadable) {
        li.className = "unreadable"; li.append("question " + q.id + " is unreadable: " + visible(q.unreadable));
        qs.appendChild(li);
        return;
      }
      li.append(el("b", q.asker), ": ", el("span", q.question, "q-text"));
      cutNote(li, q, "question", "questions");
      var buttons = (q.options || []).map(function (o) { return [o, o]; });
      buttons.push([null, "answer"]);
      li.appendChild(form("/answer-question/" + q.id, ["answer"], buttons));
      if (q.truncated && q.truncated.options) {
        var more = el("p", "more options than shown", "options-cut");
        cutNote(more, q, "options", "questions");
        li.appendChild(more);
      }
      qs.appendChild(li);
    });
    pager("questions", S.questions);
  }
  function renderMessages() {
    var ms = document.getElementById("messages"); ms.replaceChildren();
    S.messages.forEach(function (m) {
      var li = el("li"); li.dataset.id = m.id;
      if (m.unreadable) {
        li.className = "unreadable"; li.append("message " + m.id + " is unreadable: " + visible(m.unreadable));
        ms.appendChild(li);
        return;
      }
      li.append(el("b", m.from), " → ", el("b", m.to), " ", el("span", m.kind, "kind"), " ", el("span", m.body, "body"));
      cutNote(li, m, "body", "messages");
      ms.appendChild(li);
    });
  }
  // -- reading ----------------------------------------------------------------------------
  function getJson(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || r.status); return j; }); });
  }
  var loaded = false, early = [];  // events that came before the first state: applied after it
  function loadState() {
    return getJson("/api/state").then(function (s) {
      takeState(s);
      loaded = true;
      var queued = early; early = [];
      queued.forEach(function (e) { apply(e[0], e[1]); });
    }).catch(function (e) { toast("could not read the hive's state: " + e.message, true); });
  }
  function turnPage(list, how) {
    var L = S[list], after = 0, back = L.back.slice();
    if (how === "next") {
      var rows = ordered(L.rows);
      after = rows.length ? rows[rows.length - 1].id : L.after;
      back.push(L.after);
    } else if (how === "previous") {
      after = back.pop() || 0;
    } else {
      back = [];
    }
    getJson("/api/" + list + "?after=" + after + "&limit=" + PAGE).then(function (page) {
      L.after = after; L.back = back;
      takePage(L, page, page[list]);
      redraw(list);
    }).catch(function (e) { toast(e.message, true); });
  }
  var SINGULAR = { approvals: "approval", questions: "question", messages: "message" };
  function showAll(kind, id) {
    getJson("/api/" + kind + "/" + encodeURIComponent(id)).then(function (reply) {
      var row = reply[SINGULAR[kind]];
      if (kind === "messages") {
        S.messages = S.messages.map(function (m) { return String(m.id) === String(id) ? row : m; });
      } else if (Object.prototype.hasOwnProperty.call(S[kind].rows, id)) {
        S[kind].rows[id] = row;
      }
      redraw(kind);
    }).catch(function (e) { toast(e.message, true); });
  }
  // -- applying the stream's deltas ---------------------------------------------------------
  function apply(kind, d) {
    if (!loaded) { early.push([kind, d]); return; }
    if (kind === "approval" && d.approval) {
      changed(S.approvals, d.approval, d.approval.status === "pending");
      redraw("approvals");
    } else if ((kind === "question" || kind === "answer") && d.question) {
      if (d.question.to !== "operator") return;
      changed(S.questions, d.question, kind === "question" && d.question.answer == null);
      redraw("questions");
    } else if (kind === "message" && d.message) {
      S.messages = S.messages.filter(function (m) { return m.id !== d.message.id; });
      S.messages.push(d.message);
      S.messages.sort(function (a, b) { return a.id - b.id; });
      S.messages = S.messages.slice(-MESSAGES_SHOWN);
      redraw("messages");
    } else if (kind === "agent_status") {
      var name = d.agent ? d.agent.name : d.name;
      var i = S.agents.findIndex(function (a) { return a.name === name; });
      if (d.agent && i >= 0) S.agents[i] = d.agent;
      else if (d.agent) S.agents.push(d.agent);
      else if (i >= 0) S.agents.splice(i, 1);
      redraw("agents");
    } else if (kind === "egress" && d.entry) {
      mergeEgress([d.entry]); redraw("log");
    } else if (kind === "egress" && d.rows) {
      S.rules[d.agent] = d.rows; redraw("rules");
    }
  }
  document.addEventListener("click", function (ev) {
    var pg = ev.target.closest("button[data-page]");
    if (pg) { ev.preventDefault(); turnPage(pg.dataset.list, pg.dataset.page); return; }
    var more = ev.target.closest("button.show-all");
    if (more) { ev.preventDefault(); showAll(more.dataset.kind, more.dataset.id); return; }
    var b = ev.target.closest("button[data-action]");
    if (!b) return;
    ev.preventDefault();
    if (b.dataset.confirm && b.dataset.armed !== "1") {
      b.dataset.armed = "1"; b.textContent = "confirm " + b.dataset.action;
      setTimeout(function () { b.dataset.armed = ""; b.textContent = b.dataset.action; }, 3000);
      return;
    }
    post("/api/agents/" + encodeURIComponent(b.dataset.name) + "/" + b.dataset.action)
      .then(function () { toast(b.dataset.name + ": " + b.dataset.action + " done"); })
      .catch(function (e) { toast(b.dataset.name + ": " + e.message, true); });
  });
  document.addEventListener("submit", function (ev) {
    var f = ev.target;
    if (f.classList.contains("logout")) return;
    ev.preventDefault();
    var data = new FormData(f);
    var submitter = ev.submitter;
    if (submitter && submitter.name) data.set(submitter.name, submitter.value);
    var url = f.getAttribute("action");
    if (f.id === "send-form") url = "/api/agents/" + encodeURIComponent(data.get("to")) + "/send";
    if (f.id === "egress-allow-form") url = "/api/agents/" + encodeURIComponent(data.get("agent")) + "/egress/allow";
    data.delete("csrf_token"); data.delete("to"); data.delete("agent");
    post(url, Object.fromEntries(data.entries()))
      .then(function () { toast("done: " + url); })
      .catch(function (e) { toast(e.message, true); });
  });
  // The stream: each event is the changed row (summarised), applied to the state above.
  var source = new EventSource("/api/dashboard/stream");
  ["message", "question", "answer", "approval", "agent_status", "reminder", "egress"].forEach(function (k) {
    source.addEventListener(k, function (ev) {
      var d;
      try { d = JSON.parse(ev.data); } catch (e) { return; }
      apply(k, d);
    });
  });
  // After a reconnect, events may have been missed: read the state again.
  var dropped = false;
  source.addEventListener("error", function () { dropped = true; });
  source.addEventListener("open", function () { if (dropped) { dropped = false; loadState(); } });
  loadState();
})();
