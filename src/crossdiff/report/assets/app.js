// crossdiff report: the latent table and the per-latent panels, in plain JavaScript.
//
// Data arrives as scripts (file:// pages cannot fetch local files): data/<key>/table.js
// calls CROSSDIFF.addTable before this file runs; search.js and examples/<chunk>.js are
// added on demand and call CROSSDIFF.addSearch / CROSSDIFF.addExamples.
// Routes live in the URL fragment so any view can be linked to:
//   #overview   #latents/<key>[?tag=chat-only]   #latent/<key>/<latent id>
"use strict";
(function () {
  const C = window.CROSSDIFF;
  C.search = {};
  C.examples = {};
  C.timing = {};  // ms, for benchmarks/report.py: ready = since navigation start; sort, filter, search = the update
  const loading = {};
  const views = {};
  const PAGE_SIZES = [25, 50, 100, 500];

  // ---------- small helpers ----------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function loadScript(src) {
    if (!loading[src]) {
      loading[src] = new Promise((resolve, reject) => {
        const script = el("script", { src });
        script.onload = resolve;
        script.onerror = () => reject(new Error("cannot load " + src));
        document.head.append(script);
      });
    }
    return loading[src];
  }

  function fmt(value, type) {
    if (value === null || value === undefined) return "–";
    if (type === "bool") return value ? "yes" : "";
    if (type === "int" || typeof value !== "number") return String(value);
    if (value === 0) return "0";
    const a = Math.abs(value);
    if (a >= 1e5 || a < 1e-3) return value.toExponential(2);
    return String(Number(value.toPrecision(3)));
  }

  function tagClass(label) {
    return "tag tag-" + String(label).replace(/[^A-Za-z0-9]+/g, "-");
  }

  function oneLine(text) {
    return text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
  }

  function visible(text) {
    // Whitespace a reader must see: newlines as an arrow (then the break), tabs as arrows.
    return text.replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u2192");
  }

  // ---------- one table's data and view state ----------
  // Columns arrive as little-endian binary in base 64 (crossdiff/report/bundle.py): decoding
  // them into typed arrays is much faster than parsing lists of numbers. Missing = NaN.
  const TYPED = { u1: Uint8Array, i2: Int16Array, i4: Int32Array, f4: Float32Array, f8: Float64Array };

  function decodeColumns(columns) {
    for (const col of Object.values(columns)) {
      if (!col.b64) continue;
      const text = atob(col.b64), bytes = new Uint8Array(text.length);
      for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
      const array = new TYPED[col.dtype](bytes.buffer);
      if (col.type === "cat") col.codes = array; else col.values = array;
      delete col.b64;
    }
    return columns;
  }

  function table(key) { return C.tables[key]; }

  function value(t, name, i) {
    const col = t.columns[name];
    if (!col) return null;
    if (col.type === "cat") return col.codes[i] < 0 ? null : col.labels[col.codes[i]];
    const x = col.values[i];
    return x !== x ? null : x;
  }

  function moreScript(key) { return `data/${key}/more.js`; }

  C.addMore = function (key, more) {
    const t = table(key);
    Object.assign(t.columns, decodeColumns(more.columns));
    t.preview = more.preview;
    if (currentRoute.view === "latents" && currentRoute.key === key) {
      const typing = document.activeElement && document.activeElement.closest(".filters");
      if (typing) refreshTable(key); else renderLatents(key, new URLSearchParams());
    }
  };

  function rowOfLatent(t, id) {
    if (!t._rowOf) {
      t._rowOf = new Map();
      t.columns.latent.values.forEach((latent, i) => t._rowOf.set(latent, i));
    }
    return t._rowOf.get(id);
  }

  function view(key) {
    if (!views[key]) {
      const t = table(key);
      const shown = t.shown.slice();
      views[key] = {
        sort: { col: "dnorm", dir: -1 }, tag: "", verdict: "", flags: {}, ranges: [], text: "",
        page: 0, size: 50, shown, rows: null, sorted: null, sortedBy: "",
      };
    }
    return views[key];
  }

  function sortedOrder(key) {
    const t = table(key), v = view(key);
    const id = v.sort.col + ":" + v.sort.dir;
    if (v.sorted && v.sortedBy === id) return v.sorted;
    const n = t.n, col = t.columns[v.sort.col], dir = v.sort.dir;
    const order = new Int32Array(n);
    for (let i = 0; i < n; i++) order[i] = i;
    if (col && col.type === "cat") {
      const rank = col.labels.map((_, j) => j).sort((a, b) => col.labels[a].localeCompare(col.labels[b]));
      const pos = new Int32Array(col.labels.length);
      rank.forEach((j, r) => { pos[j] = r; });
      const keys = new Float64Array(n);
      for (let i = 0; i < n; i++) keys[i] = col.codes[i] < 0 ? NaN : pos[col.codes[i]];
      sortByKeys(order, keys, dir);
    } else if (col) {
      const keys = new Float64Array(n);
      for (let i = 0; i < n; i++) keys[i] = col.values[i];
      sortByKeys(order, keys, dir);
    }
    v.sorted = order;
    v.sortedBy = id;
    return order;
  }

  function sortByKeys(order, keys, dir) {
    // Missing values last in either direction; ties by latent order (stable).
    order.sort((a, b) => {
      const x = keys[a], y = keys[b];
      const xm = x !== x, ym = y !== y;
      if (xm || ym) return xm === ym ? a - b : xm ? 1 : -1;
      return x === y ? a - b : (x < y ? -dir : dir);
    });
  }

  function filteredRows(key) {
    const t = table(key), v = view(key);
    const order = sortedOrder(key);
    const tests = [];
    if (v.tag && t.columns.tag) {
      const code = t.columns.tag.labels.indexOf(v.tag), codes = t.columns.tag.codes;
      tests.push((i) => codes[i] === code);
    }
    if (v.verdict && t.columns.verdict) {
      const col = t.columns.verdict;
      if (v.verdict === "(none)") tests.push((i) => col.codes[i] < 0);
      else { const code = col.labels.indexOf(v.verdict); tests.push((i) => col.codes[i] === code); }
    }
    for (const [name, want] of Object.entries(v.flags)) {
      if (want === "any" || !t.columns[name]) continue;
      const values = t.columns[name].values, yes = want === "yes";
      tests.push((i) => !!values[i] === yes);
    }
    for (const range of v.ranges) {
      const col = t.columns[range.col];
      if (!col || col.type === "cat") continue;
      const lo = range.min === "" ? -Infinity : Number(range.min);
      const hi = range.max === "" ? Infinity : Number(range.max);
      if (lo === -Infinity && hi === Infinity) continue;
      tests.push((i) => { const x = col.values[i]; return x >= lo && x <= hi; });
    }
    const text = v.text.trim().toLowerCase();
    if (text && C.search[key]) {
      const search = C.search[key];
      tests.push((i) => search[i].includes(text));
    }
    if (!tests.length) return order;
    const out = [];
    for (let r = 0; r < order.length; r++) {
      const i = order[r];
      let ok = true;
      for (let k = 0; k < tests.length && ok; k++) ok = tests[k](i);
      if (ok) out.push(i);
    }
    return Int32Array.from(out);
  }

  // ---------- the latent table ----------
  function renderLatents(key, query) {
    const t = table(key), v = view(key);
    if (query.has("tag")) { v.tag = query.get("tag"); v.page = 0; }
    const root = document.getElementById("view-latents");
    root.replaceChildren();
    root.append(el("div", { class: "tabs" }, C.order.map((k) =>
      el("a", { href: "#latents/" + k, class: k === key ? "active" : null, text: table(k).name }))));

    const filters = el("div", { class: "filters" });
    const update = (resetPage = true) => { if (resetPage) v.page = 0; refreshTable(key); };
    const select = (label, options, current, onchange, attrs) => el("label", {}, label + " ",
      el("select", { ...attrs, onchange: (e) => onchange(e.target.value) },
        options.map(([val, text]) => el("option", { value: val, selected: val === current, text }))));

    if (t.columns.tag) {
      filters.append(select("tag", [["", "all"], ...t.columns.tag.labels.map((l) => [l, l])], v.tag,
        (x) => { v.tag = x; timed("filter", update); }, { id: "filter-tag" }));
    }
    if (t.columns.verdict) {
      filters.append(select("verdict", [["", "all"], ...t.columns.verdict.labels.map((l) => [l, l]), ["(none)", "(none)"]],
        v.verdict, (x) => { v.verdict = x; update(); }, { id: "filter-verdict" }));
    }
    for (const [name, col] of Object.entries(t.columns)) {
      if (col.type !== "bool") continue;
      filters.append(select(name, [["any", "any"], ["yes", "yes"], ["no", "no"]], v.flags[name] || "any",
        (x) => { v.flags[name] = x; update(); }, { "data-flag": name, title: col.desc }));
    }
    // The search text (a large file for a large table) loads when the search box is first used.
    const loadSearch = () => { if (t.examples) loadScript(`data/${key}/search.js`).catch(showError); };
    const search = el("input", {
      type: "search", id: "filter-text", placeholder: "text in top examples", value: v.text,
      onfocus: loadSearch, oninput: (e) => { v.text = e.target.value; loadSearch(); timed("search", update); },
    });
    filters.append(el("label", {}, "search ", search));

    const numeric = Object.keys(t.columns).filter((n) => t.columns[n].type !== "cat" && t.columns[n].type !== "bool");
    const ranges = el("div", { class: "ranges" });
    const drawRanges = () => {
      ranges.replaceChildren(...v.ranges.map((range, j) => el("span", { class: "range" },
        el("select", { onchange: (e) => { range.col = e.target.value; update(); } },
          numeric.map((n) => el("option", { value: n, selected: n === range.col, text: n }))),
        " from ", el("input", { type: "number", step: "any", value: range.min, class: "range-min",
          oninput: (e) => { range.min = e.target.value; update(); } }),
        " to ", el("input", { type: "number", step: "any", value: range.max, class: "range-max",
          oninput: (e) => { range.max = e.target.value; update(); } }),
        el("button", { title: "remove", onclick: () => { v.ranges.splice(j, 1); drawRanges(); update(); } }, "\u00d7"))),
        el("button", { id: "add-range", onclick: () => {
          v.ranges.push({ col: numeric.includes("dnorm") ? "dnorm" : numeric[0], min: "", max: "" });
          drawRanges();
        } }, "+ range"));
    };
    drawRanges();
    filters.append(ranges);

    const chooser = el("details", { class: "columns-chooser" }, el("summary", { text: "columns" }),
      t.order.filter((name) => t.columns[name]).map((name) => el("label", { title: t.columns[name].desc },
        el("input", { type: "checkbox", checked: v.shown.includes(name), onchange: (e) => {
          if (e.target.checked) v.shown = t.order.filter((n) => n === name || v.shown.includes(n));
          else v.shown = v.shown.filter((n) => n !== name);
          refreshTable(key);
        } }), name)));
    filters.append(chooser);

    root.append(filters, el("div", { class: "count", id: "count" }),
      el("div", { class: "table-wrap" }, el("table", { class: "grid latents", id: "latent-table" })),
      el("div", { class: "pager", id: "pager" }));
    refreshTable(key);
    // The other columns and the previews load once the rows are on screen.
    setTimeout(() => loadScript(moreScript(key)).catch(showError), 0);
    if (v.text.trim()) loadSearch();
  }

  function timed(label, work) {
    const started = performance.now();
    work();
    C.timing[label] = performance.now() - started;
  }

  function refreshTable(key) {
    const t = table(key), v = view(key);
    const rows = filteredRows(key);
    v.rows = rows;
    const pages = Math.max(1, Math.ceil(rows.length / v.size));
    v.page = Math.min(v.page, pages - 1);
    const waiting = v.text.trim() && !C.search[key] ? " (loading the search text\u2026)" : "";
    document.getElementById("count").textContent =
      `${rows.length.toLocaleString("en")} of ${t.n.toLocaleString("en")} latents${waiting}`;

    const tableNode = document.getElementById("latent-table");
    const head = el("tr", {}, v.shown.map((name) => {
      const arrow = v.sort.col === name ? (v.sort.dir < 0 ? " \u25bc" : " \u25b2") : "";
      return el("th", { title: t.columns[name].desc, "data-col": name, class: "sortable", onclick: () => timed("sort", () => {
        v.sort = { col: name, dir: v.sort.col === name ? -v.sort.dir : (t.columns[name].type === "cat" ? 1 : -1) };
        v.page = 0;
        refreshTable(key);
      }) }, name + arrow);
    }), t.preview ? el("th", { text: "top example" }) : null);
    const body = el("tbody");
    const start = v.page * v.size, end = Math.min(rows.length, start + v.size);
    for (let r = start; r < end; r++) {
      const i = rows[r], latent = t.columns.latent.values[i];
      const tr = el("tr", { "data-latent": latent });
      for (const name of v.shown) {
        const col = t.columns[name], x = value(t, name, i);
        let cell;
        if (name === "latent") cell = el("a", { href: `#latent/${key}/${latent}`, text: String(latent) });
        else if (name === "twin") cell = x !== null && x >= 0 ? el("a", { href: `#latent/${key}/${x}`, text: String(x) }) : "";
        else if (name === "tag" || name === "verdict") cell = x ? el("span", { class: tagClass(x), text: x }) : "";
        else cell = fmt(x, col.type);
        tr.append(el("td", { class: col.type === "cat" ? "" : "num" }, cell));
      }
      if (t.preview) {
        const p = t.preview[i];
        tr.append(el("td", { class: "preview" }, p ? [oneLine(p[0]), el("mark", { text: oneLine(p[1]) }), oneLine(p[2])] : ""));
      }
      body.append(tr);
    }
    tableNode.replaceChildren(el("thead", {}, head), body);

    const go = (page) => { v.page = page; refreshTable(key); };
    document.getElementById("pager").replaceChildren(
      el("button", { id: "prev-page", disabled: v.page === 0, onclick: () => go(v.page - 1) }, "\u2039 prev"),
      ` page ${v.page + 1} of ${pages} `,
      el("button", { id: "next-page", disabled: v.page >= pages - 1, onclick: () => go(v.page + 1) }, "next \u203a"),
      el("label", {}, " rows per page ", el("select", { onchange: (e) => { v.size = Number(e.target.value); go(0); } },
        PAGE_SIZES.map((s) => el("option", { value: s, selected: s === v.size, text: String(s) })))));
  }

  C.addSearch = function (key, texts) {
    C.search[key] = texts;  // lowercased when written
    if (currentRoute.view === "latents" && currentRoute.key === key && view(key).text.trim()) refreshTable(key);
  };

  // ---------- one latent ----------
  C.addExamples = function (key, chunk, data) {
    (C.examples[key] = C.examples[key] || {})[chunk] = data;
  };

  function renderLatent(key, latent) {
    // A shared link opens the panel directly: it needs every column first.
    loadScript(moreScript(key)).then(() => {
      if (currentRoute.view === "latent" && currentRoute.key === key && currentRoute.latent === latent) drawLatent(key, latent);
    }).catch(showError);
  }

  function drawLatent(key, latent) {
    const t = table(key), v = view(key);
    const root = document.getElementById("view-latent");
    root.replaceChildren();
    const i = rowOfLatent(t, latent);
    if (i === undefined) {
      root.append(el("p", { class: "error", text: `${t.name} has no latent ${latent}.` }));
      return;
    }
    const rows = v.rows || filteredRows(key);
    const r = rows.indexOf(i);
    const link = (row, text, id) => row === undefined ? el("span", { class: "muted", text })
      : el("a", { href: `#latent/${key}/${t.columns.latent.values[row]}`, id, text });
    const tag = value(t, "tag", i), verdict = value(t, "verdict", i);
    root.append(el("div", { class: "latent-nav" },
      el("a", { href: `#latents/${key}`, id: "back-to-table", text: "\u2190 table" }), " ",
      r >= 0 ? [link(r > 0 ? rows[r - 1] : undefined, "\u2039 previous", "prev-latent"), " ",
        link(r + 1 < rows.length ? rows[r + 1] : undefined, "next \u203a", "next-latent"),
        el("span", { class: "muted", text: ` (${r + 1} of ${rows.length} in the table's order)` })] : ""));
    root.append(el("h2", {}, `Latent ${latent} `, el("span", { class: "muted", text: t.name }), " ",
      tag ? el("span", { class: tagClass(tag), text: tag }) : "", " ",
      verdict ? el("span", { class: tagClass(verdict), text: verdict }) : ""));

    const side = el("div", { class: "side" }, findingBlock(t, latent), lensBlock(t, latent));
    const main = el("div", { class: "main" });
    root.append(numbersBlock(t, i), el("div", { class: "latent-layout" }, side, main));

    main.append(twinsBlock(key, t, i, latent));
    main.append(steeringBlock(t, latent));
    const examples = el("div", { id: "examples" });
    main.prepend(examples);
    if (!t.examples) {
      examples.append(el("p", { class: "muted", text: "This analysis stored no examples (crossdiff analyze --no-examples)." }));
      examples.dataset.state = "none";
      return;
    }
    const chunk = Math.floor(latent / t.examples.chunk);
    if (!t.examples.chunks.includes(chunk)) {
      examples.append(el("p", { class: "muted", text: "No examples: the latent never fired on the analysed tokens." }));
      examples.dataset.state = "none";
      return;
    }
    examples.append(el("p", { class: "muted", text: "loading examples\u2026" }));
    loadScript(`data/${key}/examples/${chunk}.js`).then(() => {
      if (currentRoute.view !== "latent" || currentRoute.key !== key || currentRoute.latent !== latent) return;
      const data = C.examples[key][chunk];
      const entry = data.latents[String(latent)];
      examples.replaceChildren(...histogramBlock(t, data, entry, value(t, "max_act", i)), ...exampleBlocks(t, data, entry));
      examples.dataset.state = "loaded";
    }).catch(showError);
  }

  // The latent's numbers in groups (crossdiff/report/bundle.py NUMBER_GROUPS), side by side.
  function numbersBlock(t, i) {
    const groups = t.groups || [["Numbers", t.order.filter((n) => n !== "latent")]];
    return el("div", { class: "numbers-groups" }, groups.map(([title, names]) => {
      const rows = names.filter((n) => t.columns[n]).map((name) => el("tr", {},
        el("th", { title: t.columns[name].desc, text: name }), el("td", { text: fmt(value(t, name, i), t.columns[name].type) })));
      return rows.length ? el("div", { class: "numbers-group" }, el("h4", { text: title }), el("table", { class: "kv numbers" }, rows)) : null;
    }));
  }

  // Where findings.json ranks the latent, and the evidence it ranks on.
  function findingBlock(t, latent) {
    const f = t.findings && t.findings.latents[String(latent)];
    if (!t.findings) return el("p", { class: "muted small", text: "No findings.json for this crosscoder (crossdiff run writes it after the analysis)." });
    if (!f) return el("p", { class: "muted small", text: `Not among the ${t.findings.ranked} latents findings.json ranks (the top of its chat-leaning pool of ${t.findings.pool}).` });
    const rows = [["rank", f.rank, "by evidence, among the chat-leaning pool (1 = strongest; Latent Scaling rejections last)"],
      ["concept", f.concept, "the concept it was grouped into (the overview's concepts table)"],
      ["score", f.score, "dnorm_z + contrast"], ["dnorm_z", f.dnorm_z, "dnorm relative to its distribution over live latents (robust z)"],
      ["contrast", f.contrast, "its activation on high-KL minus low-KL prompts of the behavioural diff, in standard deviations"],
      ["group", f.group, "the prompt group most of its activity falls in"], ["group_share", f.group_share, "that group's share of its activity"]];
    return el("div", { class: "finding" }, el("h3", { text: "Findings" }), el("table", { class: "kv" },
      rows.filter((r) => r[1] !== null && r[1] !== undefined).map(([name, x, desc]) =>
        el("tr", {}, el("th", { title: desc, text: name }), el("td", { text: fmt(x, typeof x === "number" ? "float" : "text") })))));
  }

  // The tokens the latent's decoder vector promotes and suppresses in each model (logit lens, findings.json).
  function lensBlock(t, latent) {
    const f = t.findings && t.findings.latents[String(latent)];
    if (!f || !f.lens) return el("p", { class: "muted small", text: "Logit-lens tokens: computed for the latents findings.json ranks (crossdiff.analysis.lens)." });
    const column = (model, what) => el("td", {}, (f.lens[model][what] || []).map(([token, logit]) =>
      el("div", { title: "logit " + fmt(logit, "float") }, el("code", { text: JSON.stringify(token) }))));
    return el("div", { class: "lens" }, el("h3", { text: "Logit lens" }),
      el("p", { class: "muted small", text: "Tokens the decoder vector promotes and suppresses, read through each model's final norm and unembedding." }),
      el("table", { class: "grid" }, el("tr", {}, ["chat: promotes", "chat: suppresses", "base: promotes", "base: suppresses"].map((h) => el("th", { text: h }))),
        el("tr", {}, column("chat", "promoted"), column("chat", "suppressed"), column("base", "promoted"), column("base", "suppressed"))));
  }

  // Active tokens per bin of the latent's max activation, one small bar chart per source.
  function histogramBlock(t, data, entry, maxAct) {
    if (!entry || !entry.hist) return [];
    const bins = data.bins, width = maxAct ? maxAct / bins : null;
    const charts = t.examples.sources.map((source, s) => {
      const counts = entry.hist[s] || [];
      const total = counts.reduce((a, b) => a + b, 0), top = Math.max(1, ...counts);
      const bars = el("div", { class: "bars" }, counts.map((c, b) => {
        const bar = el("div", { title: `${width ? fmt(b * width, "float") + "–" + fmt((b + 1) * width, "float") : `bin ${b + 1} of ${bins}`}: ${c.toLocaleString("en")} tokens` });
        bar.style.height = (100 * c / top).toFixed(0) + "%";
        return bar;
      }));
      return el("figure", { class: "histogram", "data-source": source }, bars,
        el("figcaption", { text: `${source}: ${total.toLocaleString("en")} active tokens` }));
    });
    return [el("h3", {}, "Activation histogram ", el("span", { class: "muted small", text: `active tokens per source, ${bins} bins from 0 to the max activation${maxAct ? " (" + fmt(maxAct, "float") + ")" : ""}; each source's bars scaled to its own largest bin` })),
      el("div", { class: "histograms" }, charts)];
  }

  function exampleBlocks(t, data, entry) {
    if (!entry) return [el("p", { class: "muted", text: "No examples: the latent never fired on the analysed tokens." })];
    const sources = t.examples.sources;
    const blocks = [];
    for (const [kind, title, note] of [[0, "Max-activating examples", "by activation, highest first"],
                                       [1, "Quantile samples", "drawn uniformly within bins of the latent's max activation, highest bin first"]]) {
      const mine = entry.examples.filter((ex) => ex[0] === kind);
      if (!mine.length) continue;
      const columns = el("div", { class: "columns" });
      sources.forEach((source, s) => {
        const part = mine.filter((ex) => ex[3] === s);
        columns.append(el("div", { class: "source", "data-source": source },
          el("h4", { text: `${source} (${part.length})` }),
          part.length ? part.map((ex) => exampleNode(data, ex, entry.scale, kind))
            : el("p", { class: "muted", text: `none: the latent's ${kind === 0 ? "largest activations" : "samples"} are all on other sources` })));
      });
      blocks.push(el("h3", {}, title, " ", el("span", { class: "muted small", text: note })), columns);
    }
    return blocks;
  }

  // Examples are packed (see crossdiff/report/bundle.py): `width` base-64 digits per token
  // index into the chunk's vocabulary, one base-64 digit per activation level (0..63 of scale).
  const DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";
  const LEVELS = 63;

  function exampleNode(data, ex, scale, kind) {
    const [, rank, activation, , doc, position, tokenIndex, tokens, levels] = ex;
    const label = kind === 0 ? `#${rank + 1}` : `bin ${rank}`;
    const text = el("div", { class: "tokens" });
    for (let j = 0; j < levels.length; j++) {
      let index = 0;
      for (let d = 0; d < data.width; d++) index = index * 64 + DIGITS.indexOf(tokens[j * data.width + d]);
      const span = el("span", { class: j === tokenIndex ? "tok peak" : "tok" });
      span.textContent = visible(data.vocab[index]);
      const level = DIGITS.indexOf(levels[j]);
      if (level > 0) {
        span.style.backgroundColor = `rgba(255, 120, 0, ${Math.min(1, 0.08 + level / LEVELS).toFixed(2)})`;
        span.title = "\u2248 " + fmt(level / LEVELS * scale, "float");
      }
      text.append(span);
    }
    return el("div", { class: "example" },
      el("div", { class: "meta", text: `${label} \u00b7 activation ${fmt(activation, "float")} \u00b7 doc ${doc}, position ${position}` }),
      text);
  }

  function twinsBlock(key, t, i, latent) {
    const block = el("div", { class: "twins" });
    const items = [];
    const pairs = [];
    if (t.twins) {
      t.twins.chat.forEach((c, j) => {
        if (c === latent) pairs.push(["twin", t.twins.base[j], t.twins.cos[j]]);
        if (t.twins.base[j] === latent) pairs.push(["twin of chat-only latent", c, t.twins.cos[j]]);
      });
    }
    const twin = value(t, "twin", i);
    if (!pairs.length && twin !== null && twin >= 0) pairs.push(["twin", twin, value(t, "twin_cos", i)]);
    for (const [what, other, cos] of pairs.slice(0, 20)) {
      items.push(el("li", {}, what + " ", el("a", { href: `#latent/${key}/${other}`, class: "twin-link", text: `latent ${other}` }),
        ` (decoder cosine ${fmt(cos, "float")})`, other === twin ? " \u2013 the best" : ""));
    }
    if (pairs.length > 20) items.push(el("li", { class: "muted", text: `\u2026 and ${pairs.length - 20} more` }));
    if (items.length) block.append(el("h3", { text: "Twins" }), el("ul", {}, items));
    return block;
  }

  function steeringBlock(t, latent) {
    const block = el("div", { class: "steering" });
    const rows = (t.steering || []).filter((row) => row.latent === latent);
    if (!rows.length) return block;
    block.append(el("h3", { text: "Steering samples" }), el("table", { class: "grid" },
      el("tr", {}, ["factor", "model", "prompt", "unsteered", "steered"].map((h) => el("th", { text: h }))),
      rows.map((row) => el("tr", {}, el("td", { class: "num", text: fmt(row.factor, "float") }),
        el("td", { text: row.model || "" }), el("td", { class: "text", text: row.prompt }),
        el("td", { class: "text", text: row.unsteered || "" }), el("td", { class: "text", text: row.steered })))));
    return block;
  }

  // ---------- routing ----------
  let currentRoute = {};

  function showError(err) {
    const box = el("p", { class: "error", text: String(err && err.message ? err.message : err) });
    document.querySelector("main").prepend(box);
  }

  function route() {
    const hash = decodeURIComponent(location.hash.replace(/^#/, ""));
    const [path, queryText] = hash.split("?");
    const parts = path.split("/");
    const query = new URLSearchParams(queryText || "");
    let next = { view: "overview" };
    if (parts[0] === "latents" && table(parts[1])) next = { view: "latents", key: parts[1] };
    else if (parts[0] === "latent" && table(parts[1]) && /^\d+$/.test(parts[2] || "")) {
      next = { view: "latent", key: parts[1], latent: Number(parts[2]) };
    }
    currentRoute = next;
    for (const name of ["overview", "latents", "latent"]) {
      document.getElementById("view-" + name).hidden = name !== next.view;
    }
    if (next.view === "latents") renderLatents(next.key, query);
    else if (next.view === "latent") renderLatent(next.key, next.latent);
    if (next.view !== "overview") window.scrollTo(0, 0);
    document.body.dataset.view = next.view;
  }

  for (const t of Object.values(C.tables)) decodeColumns(t.columns);
  window.addEventListener("hashchange", route);
  route();
  C.timing.ready = performance.now();
  document.body.dataset.ready = "1";
})();
