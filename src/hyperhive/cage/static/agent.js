// Live transcript for the agent page. Agent output is data: it only ever goes
// into the page through textContent, never as HTML.
(function () {
  "use strict";
  var list = document.getElementById("transcript");
  var last = Number(document.body.dataset.lastId || 0);

  function text(v) { return typeof v === "string" ? v : JSON.stringify(v); }

  function append(entry) {
    var li = document.createElement("li");
    li.className = "entry " + String(entry.kind).replace(/[^a-z_]/g, "");
    li.dataset.id = entry.id;
    var turn = document.createElement("span"); turn.className = "turn"; turn.textContent = "#" + entry.turn;
    var kind = document.createElement("span"); kind.className = "kind"; kind.textContent = entry.kind;
    var pre = document.createElement("pre"); pre.textContent = text(entry.data);
    li.append(turn, " ", kind, " ", pre);
    list.appendChild(li);
  }

  var source = new EventSource("events?after=" + last);
  source.addEventListener("entry", function (ev) {
    var entry = JSON.parse(ev.data);
    if (entry.id > last) { last = entry.id; append(entry); }
  });

  function refresh() {
    fetch("state", { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(function (s) {
      document.getElementById("status-text").textContent = s.agent.status_text || "";
      var known = {};
      document.querySelectorAll("#questions li.question").forEach(function (li) { known[li.dataset.id] = li; });
      var open = {};
      s.questions.forEach(function (q) { open[q.id] = true; });
      Object.keys(known).forEach(function (id) { if (!open[id]) { known[id].remove(); } });
    }).catch(function () {});
  }
  setInterval(refresh, 3000);
})();
