/*! referral.js: records a referral click and keeps its id for the signup.
 * Served by ingest at GET /referral.js; documented in ingest/README.md ("The browser script").
 *   <script async src="https://track.example.com/referral.js" data-param="ref"></script>
 * Data attributes: data-param (comma-separated, default "ref"), data-endpoint, data-cookie
 * (name, default "refclk"), data-cookie-days (90), data-cookie-domain, data-attribution
 * ("last" or "first"), data-respect-gpc.
 * Written by hand for every browser of the last years: no build step, no dependency. It
 * never throws into the page: every step is guarded, and `ready` never rejects. */
(function () {
  "use strict";
  var w = window;
  var d = document;
  if (w.referral && w.referral.clickId) return; // the tag twice on a page

  var ID = /^refclk_[A-Za-z0-9_-]{1,64}$/;
  var settle;
  var api = {
    ready: typeof Promise === "function" ? new Promise(function (r) { settle = r; }) : null,
    clickId: function () { return readCookie(); }
  };
  w.referral = api;

  var script = d.currentScript || d.querySelector("script[src*='referral.js']");
  function attr(name, fallback) {
    var v = script && script.getAttribute("data-" + name);
    return v === null || v === undefined || v === "" ? fallback : v;
  }
  var cookieName = attr("cookie", "refclk");
  var cookieDays = parseInt(attr("cookie-days", "90"), 10);
  if (!(cookieDays > 0)) cookieDays = 90;
  var cookieDomain = attr("cookie-domain", "");
  var first = attr("attribution", "last") === "first";

  function readCookie() {
    try {
      var parts = d.cookie.split(";");
      for (var i = 0; i < parts.length; i++) {
        var kv = parts[i].replace(/^\s+/, "");
        if (kv.indexOf(cookieName + "=") === 0) {
          var v = kv.slice(cookieName.length + 1);
          return ID.test(v) ? v : null;
        }
      }
    } catch (e) { /* cookies disabled */ }
    return null;
  }

  function writeCookie(id) {
    if (!ID.test(id) || (first && readCookie())) return;
    var c = cookieName + "=" + id + "; Max-Age=" + cookieDays * 86400 + "; Path=/; SameSite=Lax";
    if (cookieDomain) c += "; Domain=" + cookieDomain;
    if (location.protocol === "https:") c += "; Secure";
    try { d.cookie = c; } catch (e) { /* cookies disabled */ }
  }

  function done() {
    if (settle) settle(readCookie());
  }

  // `refclk_` and 128 random bits, URL-safe base64 without padding (22 characters); null
  // without a random source (ingest then makes the id).
  function newId() {
    if (!w.crypto || !w.crypto.getRandomValues) return null;
    var b = new Uint8Array(16);
    w.crypto.getRandomValues(b);
    var s = "";
    for (var i = 0; i < b.length; i++) s += String.fromCharCode(b[i]);
    return "refclk_" + btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  // One id per landing URL and tab: a reload posts the same click again, which the
  // pipeline counts once.
  function idFor(url) {
    var key = "referral:" + url;
    var id = null;
    try { id = sessionStorage.getItem(key); } catch (e) { /* storage disabled */ }
    if (!id || !ID.test(id)) {
      id = newId();
      try { if (id) sessionStorage.setItem(key, id); } catch (e) { /* storage disabled */ }
    }
    return id;
  }

  // Resolves to the click id to keep: the answer's on a readable 2xx, `id` when the answer
  // cannot be read (the operator narrowed CORS: the click was most likely recorded), and
  // null for a readable refusal (400, 429, 503) or when nothing reached ingest.
  function send(url, body, id) {
    var plain = { "Content-Type": "text/plain" };
    function beacon() {
      try {
        var sent = navigator.sendBeacon &&
          navigator.sendBeacon(url, new Blob([body], { type: "text/plain" }));
        return sent ? id : null;
      } catch (e) { return null; }
    }
    if (typeof fetch !== "function") return Promise.resolve(beacon());
    function post(mode) {
      return fetch(url, {
        method: "POST", body: body, headers: plain, mode: mode,
        credentials: "omit", keepalive: true
      });
    }
    try {
      return post("cors").then(function (r) {
        if (!r.ok) return null;
        return r.json().then(function (j) {
          return (j && j.data && j.data.click_id) || id;
        }, function () { return id; });
      }, function () {
        // Either ingest is unreachable or its answer is not readable from this origin.
        // An opaque request tells the two apart (the same click id: counted once).
        return post("no-cors").then(function () { return id; },
          function () { return null; });
      });
    } catch (e) {
      return Promise.resolve(beacon()); // e.g. a browser that refuses keepalive
    }
  }

  function run() {
    var params = new URL(location.href).searchParams;
    var names = attr("param", "ref").split(",");
    var code = "";
    for (var i = 0; i < names.length && !code; i++) {
      code = (params.get(names[i].replace(/^\s+|\s+$/g, "")) || "").replace(/^\s+|\s+$/g, "");
    }
    if (!code) return done();
    if (script && script.hasAttribute("data-respect-gpc") && navigator.globalPrivacyControl === true) {
      return done();
    }
    var endpoint = attr("endpoint", "");
    if (!endpoint) {
      endpoint = new URL("/api/v1/referrals/click", script ? script.src : location.href).href;
    }
    var id = idFor(location.href.split("#")[0]);
    var click = { code: code, landing_path: location.pathname };
    if (id) click.click_id = id;
    var utm = ["utm_source", "utm_medium", "utm_campaign"];
    for (var j = 0; j < utm.length; j++) {
      var v = params.get(utm[j]);
      if (v) click[utm[j]] = v;
    }
    send(endpoint, JSON.stringify(click), id).then(function (kept) {
      try { if (kept) writeCookie(kept); } finally { done(); }
    }, done);
  }

  try { run(); } catch (e) { done(); }
})();
