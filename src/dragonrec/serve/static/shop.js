// dragonrec storefront: reports what the visitor does as events tied to the impression (request_id) they
// answer, and runs the cart, purchase and review buttons. Plain JavaScript, no build step.
//
// Every event gets a client-made event_id, so a retried post is stored once. Events are batched for a moment,
// retried on network errors and 5xx with the same ids, and always posted with fetch keepalive, so a post in
// flight when the visitor leaves the page (a click that navigates away) still arrives.
(function () {
  "use strict";

  const HOVER_MS = 800; // the pointer rests this long on a recommended card: a hover (once per card per list)
  const SEEN_RATIO = 0.5; // a card counts as seen once this share of it was in the viewport
  const ENDPOINT = "/shop/events";
  const MAX_TRIES = 6;

  function uuid() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    // randomUUID needs a secure context; getRandomValues does not
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  // --- the event queue ----------------------------------------------------------------------------------
  let queue = []; // {event, tries, resolve, reject}, not yet acknowledged by the server
  let timer = null;
  let inFlight = 0;

  function schedule(ms) {
    if (timer === null) timer = setTimeout(() => { timer = null; flush(); }, ms);
  }

  async function send(batch) {
    const body = JSON.stringify({ events: batch.map((p) => p.event) });
    let response;
    try {
      response = await fetch(ENDPOINT, {
        method: "POST", headers: { "Content-Type": "application/json" }, body,
        credentials: "same-origin", keepalive: true,
      });
    } catch (err) {
      return retry(batch, String(err));
    }
    if (response.ok) {
      const result = await response.json().catch(() => ({}));
      batch.forEach((p) => p.resolve(result));
    } else if (response.status >= 500 || response.status === 429 || response.status === 408) {
      retry(batch, `HTTP ${response.status}`);
    } else if (batch.length > 1) {
      // the server stores a batch all or nothing: one bad event must not lose the others
      batch.forEach((p) => { queue.push(p); });
      flushEach();
    } else {
      const text = await response.text().catch(() => "");
      batch[0].reject(new Error(`HTTP ${response.status}: ${text.slice(0, 300)}`));
    }
  }

  function retry(batch, why) {
    const again = [];
    batch.forEach((p) => {
      p.tries += 1;
      if (p.tries >= MAX_TRIES) p.reject(new Error(`event not delivered: ${why}`));
      else again.push(p);
    });
    if (again.length) {
      queue.push(...again);
      schedule(Math.min(8000, 300 * 2 ** again[0].tries));
    }
  }

  async function track(batch) {
    inFlight += 1;
    try { await send(batch); } finally { inFlight -= 1; }
  }

  function flushEach() {
    const batch = queue;
    queue = [];
    batch.forEach((p) => track([p])); // singles: each stands or falls alone
  }

  function flush() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (!queue.length) return;
    const batch = queue;
    queue = [];
    track(batch);
  }

  // Report one event; the promise resolves when the server has it (stored now or already).
  function report(action, itemId, requestId, value, options) {
    const event = { event_id: uuid(), item_id: itemId, action };
    if (requestId) event.request_id = requestId;
    if (value !== undefined && value !== null) event.value = value;
    const done = new Promise((resolve, reject) => { queue.push({ event, tries: 0, resolve, reject }); });
    done.catch((err) => console.warn("dragonrec:", action, itemId, err.message));
    if (options && options.now) flush();
    else schedule(150);
    return done;
  }

  // Leaving the page: post what is queued now (keepalive lets the request outlive the page).
  window.addEventListener("pagehide", flush);
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "hidden") flush(); });

  // --- recommended cards: hover, click, scroll past ------------------------------------------------------
  const states = new Map(); // "request_id|item_id" -> {hovered, clicked, seen, passed, timer}

  function stateOf(card) {
    const key = `${card.dataset.requestId}|${card.dataset.itemId}`;
    if (!states.has(key)) states.set(key, { hovered: false, clicked: false, seen: false, passed: false, timer: null });
    return states.get(key);
  }

  const observer = "IntersectionObserver" in window ? new IntersectionObserver((entries) => {
    entries.forEach((entry) => {
      const card = entry.target;
      const st = stateOf(card);
      if (entry.isIntersecting && entry.intersectionRatio >= SEEN_RATIO) {
        st.seen = true;
      } else if (!entry.isIntersecting && st.seen && !st.hovered && !st.clicked && !st.passed) {
        st.passed = true; // it was in view, and left it without a hover or a click
        report("scroll_past", card.dataset.itemId, card.dataset.requestId);
      }
    });
  }, { threshold: [0, SEEN_RATIO] }) : null;

  document.querySelectorAll(".card[data-item-id]").forEach((card) => {
    const tracked = Boolean(card.dataset.requestId); // part of an impression: hover and scroll-past count
    if (tracked) {
      const st = stateOf(card);
      card.addEventListener("pointerenter", () => {
        if (st.hovered || st.clicked || st.timer !== null) return;
        st.timer = setTimeout(() => {
          st.timer = null;
          st.hovered = true;
          report("hover", card.dataset.itemId, card.dataset.requestId, HOVER_MS);
        }, HOVER_MS);
      });
      card.addEventListener("pointerleave", () => {
        if (st.timer !== null) { clearTimeout(st.timer); st.timer = null; }
      });
      if (observer) observer.observe(card);
    }
    card.addEventListener("click", (e) => {
      if (!e.target.closest("a")) return;
      if (tracked) {
        const st = stateOf(card);
        if (st.timer !== null) { clearTimeout(st.timer); st.timer = null; }
        if (st.clicked) return;
        st.clicked = true;
      }
      // the link navigates away now: send at once (keepalive carries it past the unload)
      report("click", card.dataset.itemId, card.dataset.requestId || null, null, { now: true });
    });
  });

  // --- cart, purchase, review ------------------------------------------------------------------------------
  function say(el, text, isError) {
    if (!el) return;
    el.textContent = text;
    el.hidden = false;
    el.classList.toggle("error", Boolean(isError));
  }

  function setCartCount(n) {
    document.querySelectorAll("[data-cart-count]").forEach((el) => {
      el.dataset.cartCount = String(n);
      el.textContent = String(n);
    });
  }
  function cartCount() {
    const el = document.querySelector("[data-cart-count]");
    return el ? Number(el.dataset.cartCount || 0) : 0;
  }

  const product = document.querySelector("[data-product]");
  if (product) {
    const itemId = product.dataset.itemId;
    const requestId = product.dataset.requestId || null;
    const status = document.getElementById("product-status");
    report("view", itemId, requestId, null, { now: true });

    const add = document.getElementById("add-to-cart");
    const buy = document.getElementById("buy-now");
    if (add) add.addEventListener("click", () => {
      add.disabled = true;
      report("add_to_cart", itemId, requestId, null, { now: true }).then(() => {
        if (product.dataset.inCart !== "1") setCartCount(cartCount() + 1);
        product.dataset.inCart = "1";
        add.textContent = "In your cart";
        say(status, "Added to your cart.");
      }, (err) => { add.disabled = false; say(status, `Could not add to cart: ${err.message}`, true); });
    });
    if (buy) buy.addEventListener("click", () => {
      buy.disabled = true;
      report("purchase", itemId, requestId, null, { now: true }).then(() => {
        if (product.dataset.inCart === "1") setCartCount(Math.max(0, cartCount() - 1));
        product.dataset.inCart = "0";
        if (add) { add.disabled = false; add.textContent = "Add to cart"; }
        buy.textContent = "Bought";
        say(status, "Thank you! Your order is placed.");
      }, (err) => { buy.disabled = false; say(status, `Could not place the order: ${err.message}`, true); });
    });

    const form = document.getElementById("review-form");
    if (form) {
      let eventId = uuid(); // one id per review, reused if the visitor retries the same submission
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        const reviewStatus = document.getElementById("review-status");
        const checked = form.querySelector("input[name=stars]:checked");
        if (!checked) { say(reviewStatus, "Choose 1 to 5 stars.", true); return; }
        const text = form.querySelector("textarea[name=text]").value;
        const button = form.querySelector("button[type=submit]");
        button.disabled = true;
        let response;
        try {
          response = await fetch("/shop/reviews", {
            method: "POST", headers: { "Content-Type": "application/json" }, credentials: "same-origin",
            body: JSON.stringify({ event_id: eventId, item_id: itemId, request_id: requestId,
              stars: Number(checked.value), text }),
          });
        } catch (err) {
          button.disabled = false;
          say(reviewStatus, "Network error: your review was not sent; try again.", true);
          return;
        }
        button.disabled = false;
        if (!response.ok) {
          const detail = await response.json().then((j) => j.detail, () => "");
          say(reviewStatus, `Your review was not saved: ${typeof detail === "string" ? detail : response.status}`, true);
          return;
        }
        const saved = await response.json();
        // built with textContent: review text is never parsed as HTML
        const li = document.createElement("li");
        li.dataset.reviewId = saved.event_id;
        const stars = document.createElement("span");
        stars.className = "stars";
        stars.textContent = "\u2605".repeat(saved.stars) + "\u2606".repeat(5 - saved.stars);
        stars.setAttribute("aria-label", `${saved.stars} of 5 stars`);
        const p = document.createElement("p");
        p.className = "review-text";
        p.textContent = saved.text;
        li.append(stars, " ", Object.assign(document.createElement("span"), { className: "muted", textContent: "just now" }), p);
        const list = document.getElementById("reviews");
        list.prepend(li);
        const none = document.getElementById("no-reviews");
        if (none) none.remove();
        form.reset();
        eventId = uuid();
        say(reviewStatus, "Thank you for your review.");
      });
    }
  }

  const cart = document.getElementById("cart");
  if (cart) {
    const status = document.getElementById("cart-status");
    const total = document.getElementById("cart-total");
    const rows = () => Array.from(cart.querySelectorAll("tr[data-item-id]"));
    const refresh = () => {
      const left = rows();
      setCartCount(left.length);
      const sum = left.reduce((s, r) => s + Number(r.dataset.price || 0), 0);
      if (total) total.textContent = `$${sum.toFixed(2)}`;
      if (!left.length) {
        document.getElementById("cart-filled").hidden = true;
        document.getElementById("cart-empty").hidden = false;
      }
    };
    cart.addEventListener("click", (e) => {
      const button = e.target.closest("button[data-remove]");
      if (!button) return;
      const row = button.closest("tr");
      button.disabled = true;
      report("remove_from_cart", row.dataset.itemId, row.dataset.requestId || null, null, { now: true }).then(() => {
        row.remove();
        refresh();
        say(status, "Removed from your cart.");
      }, (err) => { button.disabled = false; say(status, `Could not remove it: ${err.message}`, true); });
    });
    const purchase = document.getElementById("purchase");
    if (purchase) purchase.addEventListener("click", () => {
      purchase.disabled = true;
      const bought = rows();
      const done = bought.map((r) => report("purchase", r.dataset.itemId, r.dataset.requestId || null));
      flush();
      Promise.all(done).then(() => {
        bought.forEach((r) => r.remove());
        refresh();
        document.getElementById("cart-empty").hidden = true;
        say(status, `Thank you! Your order of ${bought.length} item${bought.length === 1 ? "" : "s"} is placed.`);
      }, (err) => { purchase.disabled = false; say(status, `Could not place the order: ${err.message}`, true); });
    });
  }

  // for tests and debugging: how many events are waiting or on their way
  window.dragonrec = { report, pending: () => queue.length + inFlight };
})();
