// The browser's twin of hyperhive/display.py, used by the dashboard (served by the core
// at /static/display.js) and by every agent page (served by its page server at
// static/display.js): one copy, so the two pages can't drift apart.
(function () {
  "use strict";
  // Agent text is shown, never obeyed: controls (but newline and tab), DEL, C1, bidi
  // marks/overrides/isolates, U+2028/2029 and lone surrogates become escapes, as
  // hyperhive.display does on the server. JSON text gets JSON's own escapes.
  var HIDDEN = /[\0-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]/gu;
  var JSON_HIDDEN = /[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]/gu;
  var SHORT = { "\r": "\\r" };
  function hex(ch, n) { return ch.charCodeAt(0).toString(16).padStart(n, "0"); }
  function visible(v) {
    return String(v).replace(HIDDEN, function (ch) {
      return SHORT[ch] || (ch.charCodeAt(0) < 0x100 ? "\\x" + hex(ch, 2) : "\\u" + hex(ch, 4));
    });
  }
  function visibleJson(v) {
    // A field left out (an approval's null payload) is null, not a TypeError on redraw.
    return JSON.stringify(v === undefined ? null : v).replace(JSON_HIDDEN, function (ch) { return "\\u" + hex(ch, 4); });
  }
  window.hiveDisplay = { visible: visible, visibleJson: visibleJson };
})();
