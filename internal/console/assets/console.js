// vtpmd console: live pages. A page whose <body> has data-live listens
// to the server's stream of changes (Server-Sent Events) and, at each,
// fetches its own URL again and swaps in the new #live region: no
// reload, no lost scroll position or form input. Nothing else here;
// every page works without it.
"use strict";
(function () {
  const stream = document.body.dataset.live;
  const region = () => document.getElementById("live");
  const status = document.getElementById("live-status");
  if (!stream || !region() || !window.EventSource) {
    return;
  }
  let fetching = false, again = false;
  async function refresh() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    try {
      const res = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
      if (res.ok && res.headers.get("Content-Type").startsWith("text/html")) {
        // DOMParser runs no script; the server escaped every value.
        const doc = new DOMParser().parseFromString(await res.text(), "text/html");
        const next = doc.getElementById("live");
        if (next) {
          region().replaceWith(document.adoptNode(next));
          document.body.dataset.refreshed = String(Date.now());
        }
      }
    } catch (e) {
      // The stream's error handler shows that the server is away.
    } finally {
      fetching = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }
  const es = new EventSource(stream);
  es.addEventListener("changed", refresh);
  es.addEventListener("open", () => {
    status.textContent = "Live";
    status.classList.remove("off");
  });
  es.addEventListener("error", () => {
    status.textContent = "Reconnecting…";
    status.classList.add("off");
  });
})();
