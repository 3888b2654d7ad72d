// The dashboard, live: on every hive event (SSE) it re-reads /api/state and
// redraws. Everything an agent wrote goes in through textContent only.
(function () {
  "use strict";
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var ACTIONS = ["start", "stop", "restart", "pause", "resume", "interrupt", "destroy"];

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
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
    buttons.forEach(function (b) { var x = el("button", b[1]); if (b[0]) { x.name = "answer"; x.value = b[0]; } f.appendChild(x); });
    return f;
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
      li.append(el("b", a.agent), " ", el("span", a.kind, "kind"), " ", a.description);
      li.appendChild(el("pre", JSON.stringify(a.payload), "payload"));
      li.appendChild(el("code", "sha256 " + a.payload_sha256, "sha"));
      li.appendChild(form("/approve/" + a.id, [], [[null, "approve"]]));
      li.appendChild(form("/deny/" + a.id, ["note"], [[null, "deny"]]));
      ul.appendChild(li);
    });
    var qs = document.getElementById("questions"); qs.replaceChildren();
    s.questions.forEach(function (q) {
      var li = el("li"); li.dataset.id = q.id;
      li.append(el("b", q.asker), ": ", el("span", q.question, "q-text"));
      var buttons = (q.options || []).map(function (o) { return [o, o]; });
      buttons.push([null, "answer"]);
      li.appendChild(form("/answer-question/" + q.id, ["answer"], buttons));
      qs.appendChild(li);
    });
    var ms = document.getElementById("messages"); ms.replaceChildren();
    s.messages.forEach(function (m) {
      var li = el("li");
      li.append(el("b", m.from), " → ", el("b", m.to), " ", el("span", m.kind, "kind"), " ", el("span", m.body, "body"));
      ms.appendChild(li);
    });
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
    data.delete("csrf_token"); data.delete("to");
    post(url, Object.fromEntries(data.entries()))
      .then(function () { toast("done: " + url); refresh(); })
      .catch(function (e) { toast(e.message, true); });
  });
  var source = new EventSource("/api/dashboard/stream");
  ["message", "question", "answer", "approval", "agent_status", "reminder"].forEach(function (k) {
    source.addEventListener(k, refresh);
  });
})();
