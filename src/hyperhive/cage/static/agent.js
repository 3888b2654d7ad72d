// Live transcript for the agent page, and (polled) its status, loose ends and
// egress. Agent output is data: it only ever goes into the page through
// textContent, never as HTML, and through visible() (or visibleJson()) first.
(function () {
  "use strict";
  // display.js (beside hyperhive/display.py, served with this script) defines them.
  var visible = window.hiveDisplay.visible, visibleJson = window.hiveDisplay.visibleJson;
  var list = document.getElementById("transcript");
  var last = Number(document.body.dataset.lastId || 0);

  function text(v) { return typeof v === "string" ? visible(v) : visibleJson(v); }

  function append(entry) {
    var li = document.createElement("li");
    li.className = "entry " + String(entry.kind).replace(/[^a-z_]/g, "");
    li.dataset.id = entry.id;
    var turn = document.createElement("span"); turn.className = "turn"; turn.textContent = "#" + entry.turn;
    var kind = document.createElement("span"); kind.className = "kind"; kind.textContent = visible(entry.kind);
    var pre = document.createElement("pre"); pre.textContent = entry.unreadable ? "unreadable: " + visible(entry.unreadable) : text(entry.data);
    li.append(turn, " ", kind, " ", pre);
    list.appendChild(li);
  }

  var source = new EventSource("events?after=" + last);
  source.addEventListener("entry", function (ev) {
    var entry = JSON.parse(ev.data);
    if (entry.id > last) { last = entry.id; append(entry); }
  });

  function el(tag, value, cls) {
    var e = document.createElement(tag);
    if (value !== undefined && value !== null) e.textContent = visible(value);
    if (cls) e.className = cls;
    return e;
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
  function renderEgress(s) {
    var rules = document.getElementById("egress-rules");
    rules.replaceChildren();
    (s.egress_rules || []).forEach(function (r) {
      var li = el("li", null, "rule"); li.dataset.rule = r.rule;
      li.append(el("code", r.rule), " ", el("span", r.source, "source"));
      rules.appendChild(li);
    });
    if (!rules.children.length) rules.appendChild(el("li", "no rules: this agent reaches nothing", "none"));
    var tbody = document.querySelector("#egress-log tbody");
    tbody.replaceChildren();
    (s.egress_log || []).forEach(function (e) {
      var tr = el("tr", null, "entry " + (e.allowed ? "allowed" : "refused"));
      tr.dataset.id = e.id;
      if (e.unreadable) {
        tr.className = "entry unreadable";
        var td = el("td", "decision " + e.id + " is unreadable: " + visible(e.unreadable)); td.colSpan = 7;
        tr.appendChild(td); tbody.appendChild(tr);
        return;
      }
      var open = e.allowed && !e.closed_at;
      tr.append(el("td", clock(e.at)), el("td", destination(e), "destination"), el("td", e.address || "", "address"),
        el("td", e.allowed ? "allowed" : "refused", "decision"), el("td", e.reason, "reason"),
        el("td", open ? "open" : e.bytes_up, "up"), el("td", open ? "open" : e.bytes_down, "down"));
      tbody.appendChild(tr);
    });
  }

  function refresh() {
    fetch("state", { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(function (s) {
      document.getElementById("status-text").textContent = visible(s.agent.status_text || "");
      renderEgress(s);
      // The page state is the first page of each, summarised, and how many there are.
      document.getElementById("questions-count").textContent = s.questions_total;
      document.getElementById("approvals-count").textContent = s.approvals_total;
      var known = {};
      document.querySelectorAll("#questions li.question").forEach(function (li) { known[li.dataset.id] = li; });
      var open = {};
      s.questions.forEach(function (q) { open[q.id] = true; });
      Object.keys(known).forEach(function (id) { if (!open[id]) { known[id].remove(); } });
    }).catch(function () {});
  }
  setInterval(refresh, 3000);
})();
