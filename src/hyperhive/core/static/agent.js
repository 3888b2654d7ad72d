// The operator's view of one agent (core-rendered, /agent/NAME/). htmx does the live part:
// the stream's fragments are the core's own templates (autoescaped), swapped in by id, and
// items already shown are kept as they are (hx-preserve). This script only says whether
// the stream is connected and what became of a click; text goes in with textContent.
(function () {
  "use strict";
  var visible = window.hiveDisplay.visible;
  var live = document.getElementById("live");
  var notice = document.getElementById("notice");

  function say(text, bad) {
    notice.textContent = visible(text);
    notice.className = "notice" + (bad ? " bad" : " ok");
  }
  document.body.addEventListener("htmx:sseOpen", function () {
    live.textContent = "live";
    live.className = "live ok";
  });
  document.body.addEventListener("htmx:sseError", function () {
    live.textContent = "disconnected: reconnecting…";
    live.className = "live bad";
  });
  // The open page holds no more than it opened with (red team round 23b: an agent's output
  // was appended to it forever): after each batch the stream appends, the oldest entries go
  // past data-max-entries entries or data-max-chars characters of text.
  var transcript = document.getElementById("transcript");
  var maxEntries = Number(transcript.dataset.maxEntries) || 200;
  var maxChars = Number(transcript.dataset.maxChars) || 8388608;
  var chars = 0;
  function keepWithin() {
    Array.prototype.forEach.call(transcript.children, function (li) {
      if (li.dataset.chars === undefined) {
        li.dataset.chars = String(li.textContent.length);
        chars += Number(li.dataset.chars);
      }
    });
    while (transcript.children.length > 1 &&
           (transcript.children.length > maxEntries || chars > maxChars)) {
      chars -= Number(transcript.firstElementChild.dataset.chars || 0);
      transcript.firstElementChild.remove();
    }
  }
  keepWithin();
  transcript.addEventListener("htmx:sseMessage", keepWithin);

  // What is under the pointer stays there across the stream's redraws (steady.js).
  window.hiveSteady(function (text) { say(text, true); });

  var DONE = { "approve": "approved", "deny": "denied", "answer-question": "answered" };
  // Said from the request's own XHR, not from htmx:afterRequest: the live stream may take the
  // item off the page before the POST's answer comes back, and htmx's events on a removed
  // element never reach the body, so the operator would see no word of the outcome.
  document.body.addEventListener("htmx:beforeRequest", function (ev) {
    var d = ev.detail, xhr = d.xhr;
    if (!xhr || !d.requestConfig || d.requestConfig.verb !== "post") return;
    var parts = String(d.requestConfig.path).split("/");  // "", verb, id
    var what = (DONE[parts[1]] || parts[1]) + " " + (parts[1] === "answer-question" ? "question " : "approval ") + parts[2];
    xhr.addEventListener("loadend", function () {
      if (xhr.status >= 200 && xhr.status < 300) {
        say(what);
        return;
      }
      var reason = xhr.status ? String(xhr.status) : "no answer from the hive";
      try { reason = JSON.parse(xhr.responseText).error || reason; } catch (e) { /* not JSON */ }
      say("refused: " + what.replace(/^\S+ /, "") + ": " + reason, true);
    });
  });
})();
