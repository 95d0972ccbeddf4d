// Live updates of the programme view: the server says when its figures changed
// (server-sent events); the panels are then fetched again and swapped in place, keeping
// the filters, the scroll position and the keyboard focus where they were.
(function () {
  "use strict";
  var panels = document.getElementById("panels");
  var status = document.getElementById("live-status");
  if (!panels || !window.EventSource) { return; }
  var pending = false;

  function say(text) { if (status) { status.textContent = text; } }

  function refresh() {
    if (pending) { return; }
    pending = true;
    fetch("/dashboard/panels" + window.location.search, {credentials: "same-origin"})
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); return null; }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html === null) { return; }
        var focused = document.activeElement && document.activeElement.id;
        panels.innerHTML = html;
        if (focused && document.getElementById(focused)) {
          document.getElementById(focused).focus();
        }
        say("Updated " + new Date().toLocaleTimeString());
      })
      .catch(function () { say("Live updates paused: the server did not answer"); })
      .then(function () { pending = false; });
  }

  var events = new EventSource("/dashboard/events");
  events.addEventListener("changed", refresh);
  events.addEventListener("version", function () { say("Live: updates as journeys move"); });
  events.onerror = function () { say("Live updates reconnecting…"); };
})();
