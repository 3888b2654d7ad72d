// The cockpit's glue to htmx: it draws nothing itself. The server renders every section
// (templates/cockpit/); the live stream (htmx's SSE extension) sends the sections an event
// touched, and idiomorph morphs them into the page by id. What this file adds:
//  - typed input survives a redraw: a focused field, or one whose value differs from what
//    the server rendered (a half-written answer or note), is never morphed;
//  - the session's CSRF token as a header on every htmx post; the send and allow forms
//    post to their agent's own URL;
//  - toasts go away (the server's reply, in words; a refusal's, red, is swapped in too);
//  - a visible connection state, the title's count, two clicks for stop and destroy;
//  - what is under the pointer stays there when a redraw adds or takes items above it.
(function () {
  "use strict";
  var visible = window.hiveDisplay.visible;
  var csrf = document.querySelector('meta[name="csrf-token"]').content;

  function typed(el) {
    return (el instanceof HTMLInputElement || el instanceof HTMLTextAreaElement) &&
      el.type !== "hidden" && (el === document.activeElement || el.value !== el.defaultValue ||
        ((el.type === "checkbox" || el.type === "radio") && el.checked !== el.defaultChecked));
  }
  Idiomorph.defaults.ignoreActiveValue = true;
  Idiomorph.defaults.callbacks.beforeNodeMorphed = function (old) {
    return !typed(old);
  };
  Idiomorph.defaults.callbacks.beforeAttributeUpdated = function (attr, el) {
    return !(attr === "value" && typed(el));
  };

  function toast(text, bad) {
    var t = document.createElement("div");
    t.className = "toast" + (bad ? " bad" : "");
    t.textContent = visible(text);
    document.getElementById("toasts").appendChild(t);
    setTimeout(function () { t.remove(); }, bad ? 8000 : 4000);
  }
  // Each new toast the server sent (swapped into #toasts) goes away after a while.
  document.body.addEventListener("htmx:afterSwap", function (ev) {
    if (ev.detail.target && ev.detail.target.id === "toasts") {
      document.querySelectorAll("#toasts .toast:not([data-timed])").forEach(function (t) {
        t.dataset.timed = "1";
        setTimeout(function () { t.remove(); }, t.classList.contains("bad") ? 8000 : 4000);
      });
    }
  });

  document.body.addEventListener("htmx:configRequest", function (ev) {
    var d = ev.detail;
    if (d.verb !== "post") return;
    d.headers["X-CSRF-Token"] = csrf;
    d.parameters.delete("csrf_token");
    var form = d.elt.closest ? d.elt.closest("form") : null;
    var id = form ? form.id : "";
    if (id === "send-form") {
      d.path = "/api/agents/" + encodeURIComponent(d.parameters.get("to") || "_") + "/send";
      d.parameters.delete("to");
    } else if (id === "egress-allow-form") {
      d.path = "/api/agents/" + encodeURIComponent(d.parameters.get("agent") || "_") + "/egress/allow";
      d.parameters.delete("agent");
    }
  });
  document.body.addEventListener("htmx:afterRequest", function (ev) {
    var form = ev.detail.elt && ev.detail.elt.closest ? ev.detail.elt.closest("form") : null;
    if (ev.detail.xhr && ev.detail.xhr.status < 300 && form && form.dataset.reset) form.reset();
  });
  document.body.addEventListener("htmx:sendError", function () {
    toast("the hive did not answer: is it running?", true);
  });

  // Stop and destroy take a second click within three seconds.
  document.body.addEventListener("htmx:confirm", function (ev) {
    var b = ev.detail.elt;
    if (!b.dataset || !b.dataset.confirm) return;
    if (b.dataset.armed === "1") { b.dataset.armed = ""; return; }
    ev.preventDefault();
    b.dataset.armed = "1";
    // "stop", or "stop on host b" (another host's agent's page): kept from the first click.
    var label = b.dataset.label || (b.dataset.label = b.textContent);
    b.textContent = "confirm " + label;
    setTimeout(function () { b.dataset.armed = ""; b.textContent = label; }, 3000);
  });

  // What is under the pointer stays there across the stream's redraws (steady.js).
  window.hiveSteady(function (text) { toast(text, true); });

  // The connection's state, visible; the title counts what needs the operator.
  var conn = document.getElementById("conn");
  function connection(state, text) { conn.dataset.state = state; conn.textContent = text; }
  document.body.addEventListener("htmx:sseOpen", function () { connection("live", "live"); });
  document.body.addEventListener("htmx:sseError", function () {
    connection("down", "disconnected: reconnecting…");
  });
  function title() {
    var attention = document.getElementById("attention");
    if (!attention) return;  // another host's agent's page (its own title)
    var n = Number(attention.dataset.count || 0);
    document.title = (n ? "(" + n + ") " : "") + "hyperhive";
  }
  document.body.addEventListener("htmx:oobAfterSwap", title);
  document.body.addEventListener("htmx:sseMessage", title);

  // A notification's link lands on /?focus=question-N (or approval-N): show that item and
  // put the cursor in its answer or note, once it is on the page (it may come by the stream).
  var focusId = new URLSearchParams(location.search).get("focus");
  if (!/^(question|approval)-[0-9]+$/.test(focusId || "")) focusId = null;
  function focusItem() {
    var item = focusId && document.getElementById(focusId);
    if (!item) return;
    focusId = null;
    item.classList.add("focused");
    item.scrollIntoView({ block: "center" });
    var field = item.querySelector("input:not([type=hidden]), textarea");
    if (field) field.focus();
  }
  focusItem();
  document.body.addEventListener("htmx:oobAfterSwap", focusItem);
})();
