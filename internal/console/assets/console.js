// vtpmd console: live pages. A page whose <body> has data-live listens
// to the server's stream of changes (Server-Sent Events) and, at each,
// fetches its own URL again and swaps in the new #live region: no
// reload, no lost scroll position, form input or keyboard focus.
// Nothing else here; every page works without it.
"use strict";
(function () {
  const stream = document.body.dataset.live;
  const region = () => document.getElementById("live");
  const status = document.getElementById("live-status");
  if (!stream || !region() || !window.EventSource) {
    return;
  }
  // The region's element that has the keyboard's focus is found again in
  // the new region (by id, else by link or name and text, else by place),
  // so that a live update does not throw a keyboard user to the top.
  const focusable = "a[href], button, input, select, textarea, summary, [tabindex]";
  function focusIn(within) {
    const el = document.activeElement;
    if (!el || el === within || !within.contains(el)) {
      return null;
    }
    return { el, at: Array.from(within.querySelectorAll(focusable)).indexOf(el) };
  }
  function refocus(focus, within) {
    if (!focus) {
      return;
    }
    const was = focus.el, all = Array.from(within.querySelectorAll(focusable));
    const same = (el) => el.tagName === was.tagName && el.getAttribute("href") === was.getAttribute("href") &&
      el.getAttribute("name") === was.getAttribute("name");
    const el = (was.id && document.getElementById(was.id)) || all.find((el) => same(el) && el.textContent === was.textContent) ||
      all.find(same) || all[focus.at];
    if (el) {
      el.focus({ preventScroll: true });
    }
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
          const focus = focusIn(region());
          region().replaceWith(document.adoptNode(next));
          refocus(focus, next);
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
