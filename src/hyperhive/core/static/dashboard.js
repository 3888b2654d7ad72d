// The dashboard, live: on every hive event (SSE) it re-reads /api/state and
// redraws. Everything an agent wrote goes in through textContent only, and
// through visible() (or visibleJson()) first.
(function () {
  "use strict";
  // display.js (beside hyperhive/display.py, served with this script) defines them.
  var visible = window.hiveDisplay.visible, visibleJson = window.hiveDisplay.visibleJson;
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var ACTIONS = ["start", "stop", "restart", "pause", "resume", "interrupt", "destroy"];

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
  var egressLoaded = false;
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
  function renderEgressRules(s) {
    var tbody = document.querySelector("#egress-rules tbody");
    tbody.replaceChildren();
    s.agents.forEach(function (a) {
      var rules = s.egress_rules[a.name] || [];
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
  function render(s) {
    var tbody = document.querySelector("#agents tbody");
    tbody.replaceChildren();
    s.agents.forEach(function (a) {
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
    document.getElementById("agent-count").textContent = s.agents.length;
    var ul = document.getElementById("approvals"); ul.replaceChildren();
    s.approvals.forEach(function (a) {
      var li = el("li"); li.dataset.id = a.id;
      if (a.unreadable) {  // a stored row the hive can't read: it can only be denied
        li.className = "unreadable";
        li.append("approval " + a.id + " is unreadable: " + visible(a.unreadable));
        li.appendChild(form("/deny/" + a.id, ["note"], [[null, "deny"]]));
        ul.appendChild(li);
        return;
      }
      li.append(el("b", a.agent), " ", el("span", a.kind, "kind"), " ", visible(a.description));
      if (a.allows) {
        var grant = el("p", "approving will ", "grant");
        var what = el("b", "allow egress to "); what.appendChild(el("code", a.allows, "allows"));
        grant.append(what, visible(" for " + a.agent));
        li.appendChild(grant);
      }
      li.appendChild(el("pre", visibleJson(a.payload), "payload"));
      li.appendChild(el("code", "sha256 " + a.payload_sha256, "sha"));
      li.appendChild(form("/approve/" + a.id, [], [[null, "approve"]]));
      li.appendChild(form("/deny/" + a.id, ["note"], [[null, "deny"]]));
      ul.appendChild(li);
    });
    var qs = document.getElementById("questions"); qs.replaceChildren();
    s.questions.forEach(function (q) {
      var li = el("li"); li.dataset.id = q.id;
      if (q.unreadable) {
        li.className = "unreadable"; li.append("question " + q.id + " is unreadable: " + visible(q.unreadable));
        qs.appendChild(li);
        return;
      }
      li.append(el("b", q.asker), ": ", el("span", q.question, "q-text"));
      var buttons = (q.options || []).map(function (o) { return [o, o]; });
      buttons.push([null, "answer"]);
      li.appendChild(form("/answer-question/" + q.id, ["answer"], buttons));
      qs.appendChild(li);
    });
    var ms = document.getElementById("messages"); ms.replaceChildren();
    s.messages.forEach(function (m) {
      var li = el("li");
      if (m.unreadable) {
        li.className = "unreadable"; li.append("message " + m.id + " is unreadable: " + visible(m.unreadable));
        ms.appendChild(li);
        return;
      }
      li.append(el("b", m.from), " → ", el("b", m.to), " ", el("span", m.kind, "kind"), " ", el("span", m.body, "body"));
      ms.appendChild(li);
    });
    renderEgressRules(s);
    mergeEgress(s.egress_log);  // merged, not replaced: a decision may have come in after this state
    egressLoaded = true;
    renderEgressLog();
  }
  var pending = null;
  function refresh() {
    if (pending) return;
    pending = setTimeout(function () {
      pending = null;
      fetch("/api/state", { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(render)
        .catch(function () {});
    }, 150);
  }
  document.addEventListener("click", function (ev) {
    var b = ev.target.closest("button[data-action]");
    if (!b) return;
    ev.preventDefault();
    if (b.dataset.confirm && b.dataset.armed !== "1") {
      b.dataset.armed = "1"; b.textContent = "confirm " + b.dataset.action;
      setTimeout(function () { b.dataset.armed = ""; b.textContent = b.dataset.action; }, 3000);
      return;
    }
    post("/api/agents/" + encodeURIComponent(b.dataset.name) + "/" + b.dataset.action)
      .then(function () { toast(b.dataset.name + ": " + b.dataset.action + " done"); refresh(); })
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
      .then(function () { toast("done: " + url); refresh(); })
      .catch(function (e) { toast(e.message, true); });
  });
  var source = new EventSource("/api/dashboard/stream");
  ["message", "question", "answer", "approval", "agent_status", "reminder"].forEach(function (k) {
    source.addEventListener(k, refresh);
  });
  // Egress: a decision goes straight into the log; a change of rules re-reads the state.
  source.addEventListener("egress", function (ev) {
    var d;
    try { d = JSON.parse(ev.data); } catch (e) { return; }
    if (d.entry) { mergeEgress([d.entry]); if (egressLoaded) drawEgressSoon(); } else { refresh(); }
  });
  var drawing = null;  // an agent can make decisions fast: redraw at most ten times a second
  function drawEgressSoon() {
    if (drawing) return;
    drawing = setTimeout(function () { drawing = null; renderEgressLog(); }, 100);
  }
  // The log as first served, as data: live decisions merge into it (until then they wait).
  fetch("/api/state", { credentials: "same-origin" }).then(function (r) { return r.json(); })
    .then(function (s) { mergeEgress(s.egress_log); egressLoaded = true; renderEgressLog(); })
    .catch(function () {});
})();
