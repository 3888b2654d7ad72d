// Nothing moves under the operator's pointer, on the dashboard and on an agent page (red
// team round 23b: an agent's question, sized to the gap between two "approve" buttons,
// moved another agent's under the operator's click). Before a redraw from the page's live
// stream, the element under the pointer (the nearest with an id: an item, a row) and its
// place are noted; after it, the page scrolls by what it moved (the browser's own scroll
// anchoring is off: the pages' CSS). What scrolling can't take (an item above it gone with
// the page at its top; one below it gone with the page at its end) is taken by padding on
// the page's top or bottom (re-check of session 18), given back unseen as the operator
// scrolls, or once the pointer leaves the page. If a button that was not under the
// pointer is under it still (its own item gone), a click on that button within HOLD_MS
// does nothing but say so (``refused``, the page's own way of saying things).
(function () {
  "use strict";
  var HOLD_MS = 800;
  window.hiveSteady = function (refused) {
    var px = -1, py = -1, before = null, arrived = null, arrivedAt = -Infinity;
    // The keyboard's too: the focused button morphed into another takes no Enter or Space
    // for HOLD_MS (re-check of session 19: "restart" became "destroy" under the focus).
    var focusWas = null, keyed = null, keyedAt = -Infinity;
    function focusedButton() {
      var el = document.activeElement;
      return el && el.tagName === "BUTTON" ? el : null;
    }
    var root = document.documentElement, pad = { top: 0, bottom: 0 };
    // The padding goes as it can go unseen: the top's as scroll (content stays put), the
    // bottom's once out of view; all of it when the pointer is off the page.
    // The scroll back comes first: t is within scrollY, so nothing clamps it, and the page,
    // shorter by t after, still holds the scroll (padding taken away first let the page's
    // end clamp it: the content came down by up to t, unheld; red team of session 19).
    function giveBack(all) {
      var under = all ? null : whatIs(buttonOf(atPointer()));
      if (pad.top > 0) {
        var t = all ? pad.top : Math.min(pad.top, window.scrollY);
        if (t > 0) {
          if (!all) window.scrollBy(0, -t);
          pad.top -= t;
          root.style.paddingTop = pad.top ? pad.top + "px" : "";
        }
      }
      if (pad.bottom > 0) {
        var hidden = root.scrollHeight - (window.scrollY + window.innerHeight);
        var b = all ? pad.bottom : Math.min(pad.bottom, Math.max(0, hidden));
        if (b > 0) {
          pad.bottom -= b;
          root.style.paddingBottom = pad.bottom ? pad.bottom + "px" : "";
        }
      }
      if (!all) heldIfArrived(under);  // meant to move nothing: if it did, as a redraw's
    }
    // A button is what it does: its form's action, its name and value, its label. A morph
    // keeps the element and may change all of those under the pointer (an agent's row:
    // "stop" becoming "start"; red team of session 19), so that counts as arriving too.
    function whatIs(b) {
      if (!b) return null;
      var form = b.form ? (b.form.getAttribute("action") || "") + " " +
        (b.form.getAttribute("hx-post") || "") : "";
      var key = [form, b.getAttribute("hx-post") || "", b.name, b.value, b.textContent];
      return { el: b, key: key.join("\u0000") };
    }
    function heldIfArrived(was) {
      var now = whatIs(buttonOf(atPointer()));
      if (now && (!was || now.el !== was.el || now.key !== was.key)) {
        arrived = now.el;
        arrivedAt = performance.now();
      }
    }
    window.addEventListener("scroll", function () {
      if (pad.top > 0 || pad.bottom > 0) giveBack(false);
    }, { passive: true });
    root.addEventListener("mouseleave", function () { px = py = -1; giveBack(true); });
    document.addEventListener("mousemove", function (ev) { px = ev.clientX; py = ev.clientY; },
      { passive: true, capture: true });
    function atPointer() {
      return px < 0 ? null : document.elementFromPoint(px, py);
    }
    function buttonOf(el) { return el ? el.closest("button") : null; }
    document.body.addEventListener("htmx:sseBeforeMessage", function () {
      focusWas = whatIs(focusedButton());
      var el = atPointer(), item = el;
      while (item && item !== document.body && !item.id) item = item.parentElement;
      var kept = item && item !== document.body;
      before = el ? {
        button: whatIs(buttonOf(el)),
        id: kept ? item.id : null,
        top: kept ? item.getBoundingClientRect().top : 0,
      } : null;
    });
    document.body.addEventListener("htmx:sseMessage", function () {
      var f = whatIs(focusedButton());
      if (f && focusWas && f.el === focusWas.el && f.key !== focusWas.key) {
        keyed = f.el;
        keyedAt = performance.now();
      }
      focusWas = null;
      var was = before;
      before = null;
      if (!was) return;
      var item = was.id ? document.getElementById(was.id) : null;
      if (item) {
        var moved = item.getBoundingClientRect().top - was.top;
        if (Math.abs(moved) >= 1) window.scrollBy(0, moved);
        var left = item.getBoundingClientRect().top - was.top;
        if (left <= -1) {  // at the top: room above, so the item stays where it was
          pad.top += -left;
          root.style.paddingTop = pad.top + "px";
        } else if (left >= 1) {  // at the end: room below, to scroll on by what is left
          pad.bottom += left;
          root.style.paddingBottom = pad.bottom + "px";
          window.scrollBy(0, left);
        }
      }
      heldIfArrived(was.button);
    });
    document.addEventListener("click", function (ev) {
      var b = ev.target instanceof Element ? ev.target.closest("button") : null;
      var now = performance.now();
      var byPointer = b && b === arrived && now - arrivedAt <= HOLD_MS;
      var byKey = b && ev.detail === 0 && b === keyed && now - keyedAt <= HOLD_MS;
      if (!byPointer && !byKey) return;
      if (byPointer) arrived = null;
      if (byKey) keyed = null;
      ev.preventDefault();
      ev.stopPropagation();
      refused(byPointer
        ? "the page moved under the pointer: nothing was done; click again if that is what you meant"
        : "the focused button changed: nothing was done; press it again if that is what you meant");
    }, true);
  };
})();
