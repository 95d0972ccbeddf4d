// Accessibility checks run inside the page (tests/browser/a11y.py calls them).
// One expression: a function of (check, arg) returning plain JSON values.
async (check, arg) => {
  const SKIP_TEXT = new Set(["SCRIPT", "STYLE", "NOSCRIPT", "TEMPLATE", "TITLE", "OPTION"]);
  const FOCUSABLE = "a[href], button, input, select, textarea, summary, iframe, " +
    "[tabindex], [contenteditable]:not([contenteditable='false'])";
  const NON_CONTROL_INPUTS = new Set(["hidden", "submit", "button", "reset", "image"]);
  const BUTTON_INPUTS = new Set(["submit", "button", "reset"]);

  const ids = (window.__atmA11yIds ??= { map: new WeakMap(), next: 1 });
  const idOf = (el) => {
    if (!ids.map.has(el)) ids.map.set(el, ids.next++);
    return ids.map.get(el);
  };

  const visible = (el) => {
    if (!el.isConnected || el.getClientRects().length === 0) return false;
    return el.checkVisibility({ visibilityProperty: true, contentVisibilityAuto: true });
  };

  const squash = (text) => (text || "").replace(/\s+/g, " ").trim();

  const describe = (el) => {
    let out = "<" + el.tagName.toLowerCase();
    if (el.id) out += "#" + el.id;
    const classes = [...el.classList].slice(0, 2);
    if (classes.length) out += "." + classes.join(".");
    for (const attr of ["type", "name", "href", "role"]) {
      if (el.hasAttribute(attr)) out += ` ${attr}="${el.getAttribute(attr).slice(0, 40)}"`;
    }
    out += ">";
    const text = squash(el.textContent).slice(0, 40);
    return text ? `${out} "${text}"` : out;
  };

  // The text a user agent reads out for content (aria-hidden parts left out).
  const contentText = (node) => {
    if (node.nodeType === Node.TEXT_NODE) return node.nodeValue;
    if (node.nodeType !== Node.ELEMENT_NODE) return "";
    if (node.getAttribute("aria-hidden") === "true" || SKIP_TEXT.has(node.tagName)) return "";
    if (node.hasAttribute("aria-label") && squash(node.getAttribute("aria-label"))) {
      return " " + node.getAttribute("aria-label") + " ";
    }
    if (node.tagName === "IMG") return " " + (node.getAttribute("alt") || "") + " ";
    if (node.tagName.toLowerCase() === "svg") {
      const title = node.querySelector(":scope > title");
      return title ? " " + title.textContent + " " : "";
    }
    return [...node.childNodes].map(contentText).join("");
  };

  const labelledBy = (el) => squash((el.getAttribute("aria-labelledby") || "").split(/\s+/)
    .map((id) => document.getElementById(id)).filter(Boolean).map(contentText).join(" "));

  const isFormControl = (el) => ["SELECT", "TEXTAREA"].includes(el.tagName) ||
    (el.tagName === "INPUT" && !NON_CONTROL_INPUTS.has((el.type || "").toLowerCase()));

  // The accessible name, simplified from https://www.w3.org/TR/accname-1.2/: form
  // controls take only labels, aria-label and aria-labelledby (not title or placeholder).
  const accessibleName = (el) => {
    const byIds = labelledBy(el);
    if (byIds) return byIds;
    const label = squash(el.getAttribute("aria-label"));
    if (label) return label;
    if (isFormControl(el)) {
      return squash([...(el.labels || [])].map(contentText).join(" "));
    }
    if (el.tagName === "INPUT" && BUTTON_INPUTS.has(el.type)) {
      return squash(el.value) || (el.type === "submit" ? "Submit" : el.type === "reset" ? "Reset" : "");
    }
    if (el.tagName === "INPUT" && el.type === "image") return squash(el.getAttribute("alt"));
    if (el.tagName === "IMG") return squash(el.getAttribute("alt"));
    if (el.tagName.toLowerCase() === "svg") {
      const title = el.querySelector(":scope > title");
      if (title && squash(title.textContent)) return squash(title.textContent);
    } else {
      const text = squash(contentText(el));
      if (text) return text;
    }
    return squash(el.getAttribute("title"));
  };

  const names = () => {
    const problems = [];
    for (const el of document.querySelectorAll("input, select, textarea")) {
      if (isFormControl(el) && visible(el) && !accessibleName(el)) {
        problems.push(`form control without a label (label for, wrapping label, aria-label ` +
          `or aria-labelledby): ${describe(el)}`);
      }
    }
    const actions = "button, input[type=submit], input[type=button], input[type=reset], " +
      "input[type=image], [role=button], a[href], [role=link]";
    for (const el of document.querySelectorAll(actions)) {
      if (visible(el) && !accessibleName(el)) {
        const what = el.matches("a[href], [role=link]") ? "link" : "button";
        problems.push(`${what} without text: ${describe(el)}`);
      }
    }
    for (const el of document.querySelectorAll("img, svg[role=img]")) {
      if (!visible(el)) continue;
      // alt="" marks an image as decoration (WCAG technique H67): a name is not needed.
      const named = el.tagName === "IMG" ? el.hasAttribute("alt") || accessibleName(el)
        : accessibleName(el);
      if (!named) problems.push(`image without alt, aria-label or title: ${describe(el)}`);
    }
    return problems;
  };

  // -- contrast (WCAG 2.x, https://www.w3.org/TR/WCAG22/#dfn-contrast-ratio) ------------
  const canvas = document.createElement("canvas").getContext("2d", { willReadFrequently: true });
  const rgba = (css) => {
    const m = css.match(/^rgba?\(\s*([\d.]+)[,\s]+([\d.]+)[,\s]+([\d.]+)(?:\s*[,/]\s*([\d.]+)(%?))?\s*\)$/);
    if (m) {
      const alpha = m[4] === undefined ? 1 : Number(m[4]) / (m[5] ? 100 : 1);
      return [Number(m[1]), Number(m[2]), Number(m[3]), alpha];
    }
    canvas.clearRect(0, 0, 1, 1);  // any other syntax (oklch(), color(srgb ...)): let the
    canvas.fillStyle = css;        // browser convert it to sRGB by painting one pixel
    canvas.fillRect(0, 0, 1, 1);
    const [r, g, b, a] = canvas.getImageData(0, 0, 1, 1).data;
    return [r, g, b, a / 255];
  };
  const over = (top, below) => {  // `top` painted over an opaque `below`
    const a = top[3];
    return [0, 1, 2].map((i) => top[i] * a + below[i] * (1 - a)).concat(1);
  };
  const luminance = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => {
      const s = v / 255;
      return s <= 0.04045 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (a, b) => {
    const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
    return (hi + 0.05) / (lo + 0.05);
  };
  // The colour behind an element: its own and its ancestors' backgrounds down to the
  // first opaque one, over white; null when a background image is in the way.
  const backgroundOf = (el) => {
    const layers = [];
    for (let node = el; node && node.nodeType === Node.ELEMENT_NODE; node = node.parentElement) {
      const style = getComputedStyle(node);
      if (style.backgroundImage !== "none") return null;
      const color = rgba(style.backgroundColor);
      if (color[3] > 0) layers.push(color);
      if (color[3] >= 1) break;
    }
    return layers.reverse().reduce((below, top) => over(top, below), [255, 255, 255, 1]);
  };
  const css = (c) => `rgb(${c.slice(0, 3).map(Math.round).join(", ")})`;

  const contrast = () => {
    const problems = [];
    for (const el of document.body.querySelectorAll("*")) {
      if (SKIP_TEXT.has(el.tagName)) continue;
      const direct = [...el.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.nodeValue.trim());
      if (!direct || !visible(el) || el.closest(":disabled, [aria-disabled=true]")) continue;
      const box = el.getBoundingClientRect();
      if (box.width <= 1 || box.height <= 1) continue;  // visually hidden, for screen readers
      const background = backgroundOf(el);
      if (!background) continue;
      const style = getComputedStyle(el);
      const text = over(rgba(style.color), background);
      const size = parseFloat(style.fontSize);
      const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
      const needed = large ? 3 : 4.5;
      const found = ratio(text, background);
      if (found < needed) {
        problems.push(`contrast ${found.toFixed(2)}:1 below ${needed}:1 ` +
          `(${css(text)} on ${css(background)}, ${size}px${large ? ", large" : ""}): ${describe(el)}`);
      }
    }
    return problems;
  };

  // -- keyboard -----------------------------------------------------------------------
  const ringOf = (el) => {
    const s = getComputedStyle(el);
    const outline = s.outlineStyle !== "none" && parseFloat(s.outlineWidth) > 0
      ? `${s.outlineStyle} ${s.outlineWidth} ${s.outlineColor}` : "none";
    return `${outline} | ${s.boxShadow}`;
  };
  // Let CSS transitions (of focus styles) finish, waiting 1 s at most.
  const settle = async (animations) => {
    const running = animations.filter((a) => a instanceof CSSTransition)
      .map((a) => a.finished.catch(() => null));
    await Promise.race([Promise.all(running), new Promise((r) => setTimeout(r, 1000))]);
  };

  // Before a walk: note how each focusable element looks unfocused, then move the
  // sequential focus navigation starting point to the top of the document (a blur alone
  // leaves it at the blurred element): focus a scratch element placed first, remove it.
  const startWalk = async () => {
    const scratch = document.createElement("span");
    scratch.tabIndex = -1;
    document.body.prepend(scratch);
    scratch.focus();
    await settle(document.getAnimations());  // an element losing its focus ring
    window.__atmA11yRings = new WeakMap();
    for (const el of document.querySelectorAll(FOCUSABLE)) {
      window.__atmA11yRings.set(el, ringOf(el));
    }
    scratch.remove();
  };

  const focused = async () => {
    const el = document.activeElement;
    if (!el || el === document.body || el === document.documentElement) return null;
    await settle(el.getAnimations());
    const before = window.__atmA11yRings?.get(el);
    return {
      id: idOf(el),
      tag: el.tagName.toLowerCase(),
      name: accessibleName(el),
      description: describe(el),
      indicator: before === undefined ? null : ringOf(el) !== before,
    };
  };

  const documentProblems = () => {
    const problems = [];
    if (!squash(document.documentElement.getAttribute("lang"))) {
      problems.push("<html> has no lang attribute");
    }
    if (!squash(document.title)) problems.push("the document has no <title>");
    const h1 = document.querySelectorAll("h1").length;
    if (h1 !== 1) problems.push(`the document has ${h1} <h1> elements, not exactly one`);
    const mains = [...document.querySelectorAll("main, [role=main]")].filter((el) => !el.hidden);
    if (mains.length !== 1) problems.push(`the document has ${mains.length} <main> landmarks, not one`);
    return problems;
  };

  const checks = { names, contrast, startWalk, focused, document: documentProblems };
  return await checks[check](arg);
}
