// Private GPT's own page behaviour. No inline script anywhere: the Content-Security-Policy forbids it.
(function () {
  "use strict";

  // Reconnect a reply's stream where it left off. EventSource itself resends Last-Event-ID when it
  // reconnects, but the SSE extension builds a new EventSource after a hard failure, which would
  // start again from the `after` the page was rendered with; we keep the newest event id per URL.
  var lastEventIds = new Map();
  function withAfter(url, id) {
    var u = new URL(url, window.location.href);
    u.searchParams.set("after", id);
    return u.pathname + u.search;
  }
  function installEventSourceFactory() {
    htmx.createEventSource = function (url) {
      var source = new EventSource(lastEventIds.has(url) ? withAfter(url, lastEventIds.get(url)) : url,
                                   { withCredentials: true });
      source.addEventListener("token", function (event) {
        if (event.lastEventId) lastEventIds.set(url, event.lastEventId);
      });
      return source;
    };
  }

  function transcript() { return document.getElementById("transcript"); }

  function updateBusy() {
    var log = transcript();
    if (log) log.setAttribute("aria-busy", log.querySelector("[sse-connect]") ? "true" : "false");
  }

  function scrollToEnd() {
    var log = transcript();
    if (log) log.scrollTop = log.scrollHeight;
  }

  document.addEventListener("DOMContentLoaded", function () {
    installEventSourceFactory();
    scrollToEnd();

    // Enter sends, Shift+Enter makes a new line.
    document.body.addEventListener("keydown", function (event) {
      var box = event.target;
      if (box.id === "message" && event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (box.value.trim()) box.form.requestSubmit();
      }
    });

    // Copy a message's text.
    document.body.addEventListener("click", function (event) {
      var button = event.target.closest("button.copy");
      if (!button) return;
      navigator.clipboard.writeText(button.dataset.copy || "").then(function () {
        button.textContent = "Copied";
        setTimeout(function () { button.textContent = "Copy"; }, 1500);
      });
    });

    // After a successful send: clear the composer and any old notice. A refused send keeps the text.
    document.body.addEventListener("htmx:afterRequest", function (event) {
      var form = event.detail.elt;
      if (form.id === "composer" && event.detail.successful) {
        form.reset();
        document.getElementById("notice").textContent = "";
      }
    });

    document.body.addEventListener("htmx:afterSwap", function () { updateBusy(); scrollToEnd(); });
    document.body.addEventListener("htmx:sseMessage", scrollToEnd);
    document.body.addEventListener("htmx:sseClose", updateBusy);
  });
})();
