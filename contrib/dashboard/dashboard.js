// Overdrive live dashboard: polls the stats endpoint and draws canvas line charts.
// No dependencies. Every section of the stats is optional: a chart whose
// figures never appeared says so instead of drawing.
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("overdrive-config").textContent);
  const HISTORY = config.history || 300;
  const COLORS = ["#4ea1ff", "#ffb84e", "#ff6b6b", "#5fd38d", "#c792ea", "#56d4dd", "#f78c6c"];

  // Drop a token from the address bar: the server answered with a cookie.
  if (window.location.search.indexOf("token=") >= 0 && window.history.replaceState) {
    window.history.replaceState(null, "", window.location.pathname);
  }

  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
  const get = (obj, path) => {
    let cur = obj;
    for (const key of path.split(".")) {
      if (cur === null || typeof cur !== "object" || !(key in cur)) return null;
      cur = cur[key];
    }
    return cur;
  };
  const first = (obj, paths) => {
    for (const p of paths) {
      const v = num(get(obj, p));
      if (v !== null) return v;
    }
    return null;
  };
  const MB = 1048576;

  function gpuDevices(stats) {
    const gpu = stats.gpu;
    if (!gpu || typeof gpu !== "object") return null;
    const out = {};
    // Per-device lists at the section's top (the gpu plugin: reserved_mb[i], budgets_mb[i]).
    [["reserved_mb", ""], ["used_mb", ""], ["memory_used_mb", ""], ["budgets_mb", " budget"]].forEach(([key, suffix]) => {
      const list = gpu[key];
      if (!Array.isArray(list)) return;
      list.forEach((v, i) => { if (num(v) !== null) out["gpu " + i + suffix] = v; });
    });
    if (Object.keys(out).length) return out;
    let devices = Array.isArray(gpu.devices) || (gpu.devices && typeof gpu.devices === "object") ? gpu.devices : gpu.gpus || null;
    if (!devices) return null;
    if (!Array.isArray(devices)) {
      devices = Object.keys(devices).map((k) => Object.assign({ name: k }, devices[k]));
    }
    devices.forEach((d, i) => {
      if (!d || typeof d !== "object") return;
      const label = "gpu " + (d.index !== undefined ? d.index : d.device !== undefined ? d.device : d.name || i);
      let mb = first(d, ["memory_used_mb", "used_mb", "allocated_mb", "memory_allocated_mb", "reserved_mb"]);
      if (mb === null) {
        const bytes = first(d, ["memory_used", "used_bytes", "memory_allocated", "allocated_bytes", "allocated", "used"]);
        if (bytes !== null) mb = bytes / MB;
      }
      if (mb !== null) out[label] = mb;
    });
    return Object.keys(out).length ? out : null;
  }

  function memory(stats) {
    const out = {};
    let rss = first(stats, ["memory.rss_mb", "memory.process_rss_mb", "system.process_rss_mb"]);
    if (rss === null) {
      const bytes = first(stats, ["memory.rss", "memory.rss_bytes"]);
      if (bytes !== null) rss = bytes / MB;
    }
    if (rss !== null) out["process RSS MB"] = rss;
    const pct = first(stats, ["memory.percent", "system.memory_percent"]);
    if (pct !== null) out["system %"] = pct;
    return Object.keys(out).length ? out : null;
  }

  // The breaker section: {name: {state, ...}} (the breaker plugin) or {breakers: {...}}.
  function breakerTable(stats) {
    const section = stats.breaker;
    if (!section || typeof section !== "object") return null;
    if (section.breakers && typeof section.breakers === "object") return section.breakers;
    const names = Object.keys(section).filter((k) => section[k] && typeof section[k] === "object" && "state" in section[k]);
    if (!names.length) return Object.keys(section).length ? null : {};
    const out = {};
    names.forEach((k) => { out[k] = section[k]; });
    return out;
  }

  function breakerCounts(stats) {
    const b = breakerTable(stats);
    if (!b) return null;
    const out = { closed: 0, half_open: 0, open: 0 };
    Object.keys(b).forEach((name) => {
      const state = String((b[name] && b[name].state) || "closed").toLowerCase().replace("-", "_");
      out[state] = (out[state] || 0) + 1;
    });
    return out;
  }

  let lastRequests = null;
  let lastTime = null;
  function throughput(stats, t) {
    const rps = num(get(stats, "profiler.throughput_rps"));
    const requests = num(get(stats, "profiler.requests"));
    let instant = null;
    if (requests !== null && lastRequests !== null && t > lastTime) {
      instant = Math.max(0, (requests - lastRequests) / (t - lastTime));
    }
    lastRequests = requests;
    lastTime = t;
    if (rps === null && instant === null) return null;
    const out = {};
    if (instant !== null) out["req/s (now)"] = instant;
    if (rps !== null) out["req/s (window)"] = rps;
    return out;
  }

  const CHARTS = [
    { id: "latency", title: "Latency (recent, ms)", unit: "ms", extract: (s) => {
      const r = get(s, "profiler.recent_latency");
      if (!r) return null;
      return { p50: r.p50 * 1000, p95: r.p95 * 1000, p99: r.p99 * 1000 };
    } },
    { id: "throughput", title: "Throughput (requests/s)", unit: "/s", extract: throughput },
    { id: "errors", title: "Error rate (%)", unit: "%", extract: (s) => {
      const e = num(get(s, "profiler.error_rate"));
      return e === null ? null : { errors: e * 100 };
    } },
    { id: "cache", title: "Cache hit rate (%)", unit: "%", extract: (s) => {
      const h = num(get(s, "cache.hit_rate"));
      return h === null ? null : { "hit rate": h <= 1 ? h * 100 : h };
    } },
    { id: "breakers", title: "Circuit breakers by state", unit: "", extract: breakerCounts },
    { id: "gpu", title: "GPU memory per device (MB)", unit: "MB", extract: gpuDevices },
    { id: "workers", title: "Worker pool", unit: "", extract: (s) => {
      const w = num(get(s, "tasks.current_workers"));
      const q = num(get(s, "tasks.queue_depth"));
      if (w === null && q === null) return null;
      const out = {};
      if (w !== null) out.workers = w;
      if (q !== null) out["queue depth"] = q;
      return out;
    } },
    { id: "jobs", title: "Jobs by state", unit: "", extract: (s) => {
      const j = get(s, "jobs.jobs");
      if (!j || typeof j !== "object") return null;
      const out = {};
      ["queued", "running", "failed", "cancelled"].forEach((k) => { if (num(j[k]) !== null) out[k] = j[k]; });
      return out;
    } },
    { id: "jobwait", title: "Job queue wait p95 by tenant (s)", unit: "s", extract: (s) => {
      const w = get(s, "jobs.wait_by_tenant");
      if (!w || typeof w !== "object") return null;
      const out = {};
      Object.keys(w).slice(0, 8).forEach((t) => { const v = num(w[t] && w[t].p95); if (v !== null) out[t] = v; });
      return Object.keys(out).length ? out : null;
    } },
    { id: "memory", title: "Memory", unit: "", extract: memory },
  ];

  const main = document.getElementById("charts");
  CHARTS.forEach((c) => {
    const box = document.createElement("section");
    box.className = "chart";
    box.id = "chart-" + c.id;
    const h = document.createElement("h2");
    h.textContent = c.title;
    const canvas = document.createElement("canvas");
    const legend = document.createElement("div");
    legend.className = "legend";
    box.append(h, canvas, legend);
    main.appendChild(box);
    c.canvas = canvas;
    c.legend = legend;
    c.times = [];
    c.series = {};
    c.drawn = false;
  });

  function push(chart, t, values) {
    chart.times.push(t);
    const names = values ? Object.keys(values) : [];
    names.forEach((n) => { if (!chart.series[n]) chart.series[n] = new Array(chart.times.length - 1).fill(null); });
    Object.keys(chart.series).forEach((n) => {
      chart.series[n].push(values && n in values ? num(values[n]) : null);
    });
    if (chart.times.length > HISTORY) {
      chart.times.shift();
      Object.keys(chart.series).forEach((n) => chart.series[n].shift());
    }
  }

  function fmt(v) {
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a >= 0.1) return v.toFixed(2);
    return v.toPrecision(2);
  }

  function draw(chart) {
    const canvas = chart.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 400;
    const h = canvas.clientHeight || 180;
    if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
    if (canvas.height !== Math.round(h * dpr)) canvas.height = Math.round(h * dpr);
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const names = Object.keys(chart.series);
    let max = 0;
    let points = 0;
    names.forEach((n) => chart.series[n].forEach((v) => { if (v !== null) { points++; if (v > max) max = v; } }));
    const css = getComputedStyle(document.documentElement);
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = css.getPropertyValue("--muted") || "#888";
    if (!points) {
      g.fillText(names.length ? "waiting for data…" : "not enabled", 10, h / 2);
      chart.legend.textContent = "";
      chart.drawn = false;
      return;
    }
    if (max <= 0) max = 1;
    max *= 1.1;
    const left = 44, right = 8, top = 8, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    g.strokeStyle = css.getPropertyValue("--grid") || "#333";
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + pw, y); g.stroke();
      g.fillText(fmt((max * i) / 4), 2, y + 4);
    }
    const n = chart.times.length;
    const t0 = chart.times[0], t1 = chart.times[n - 1];
    const span = Math.max(t1 - t0, 1e-3);
    g.fillText((span < 10 ? span.toFixed(1) : Math.round(span)) + " s", left + pw - 30, h - 4);
    names.forEach((name, k) => {
      const data = chart.series[name];
      g.strokeStyle = COLORS[k % COLORS.length];
      g.lineWidth = 1.5;
      g.beginPath();
      let pen = false;
      for (let i = 0; i < n; i++) {
        const v = data[i];
        if (v === null || v === undefined) { pen = false; continue; }
        const x = left + (n === 1 ? pw : (pw * (chart.times[i] - t0)) / span);
        const y = top + ph - (ph * v) / max;
        if (pen) g.lineTo(x, y); else { g.moveTo(x, y); pen = true; }
      }
      g.stroke();
    });
    chart.legend.textContent = "";
    names.forEach((name, k) => {
      const data = chart.series[name];
      const last = data[data.length - 1];
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = COLORS[k % COLORS.length];
      item.append(swatch, name + (last !== null && last !== undefined ? " " + fmt(last) : ""));
      chart.legend.appendChild(item);
    });
    chart.drawn = true;
  }

  function breakers(stats) {
    const box = document.getElementById("breakers");
    const b = breakerTable(stats);
    if (!b) return;
    box.textContent = "";
    const names = Object.keys(b).sort();
    if (!names.length) { box.innerHTML = '<span class="muted">no breakers yet</span>'; return; }
    names.forEach((name) => {
      const state = String((b[name] && b[name].state) || "closed").toLowerCase().replace("-", "_");
      const chip = document.createElement("span");
      chip.className = "chip " + state;
      chip.textContent = name + ": " + state;
      box.appendChild(chip);
    });
  }

  function routes(stats) {
    const rows = get(stats, "profiler.routes");
    if (!Array.isArray(rows)) return;
    const body = document.querySelector("#routes tbody");
    body.textContent = "";
    rows.slice().sort((a, b) => b.count - a.count).slice(0, 50).forEach((r) => {
      const tr = document.createElement("tr");
      const q = r.phases && r.count ? (r.phases.queue_wait / r.count) * 1000 : 0;
      [r.route, r.method, r.status, r.count, r.errors, fmt(r.p50 * 1000), fmt(r.p95 * 1000),
        fmt(r.p99 * 1000), fmt(q)].forEach((v) => {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  const status = document.getElementById("status");
  const summary = document.getElementById("summary");

  function render(stats) {
    const t = num(stats.timestamp) || Date.now() / 1000;
    CHARTS.forEach((c) => {
      let values = null;
      try { values = c.extract(stats, t); } catch (e) { values = null; }
      push(c, t, values);
      draw(c);
    });
    breakers(stats);
    routes(stats);
    const failing = Object.keys(stats).filter((k) => stats[k] && typeof stats[k] === "object" && "error" in stats[k] && Object.keys(stats[k]).length === 1);
    const plugins = get(stats, "host.plugins") || {};
    const quarantined = Object.keys(plugins).filter((k) => plugins[k] && plugins[k].quarantined);
    const reqs = num(get(stats, "profiler.requests"));
    const parts = [];
    if (reqs !== null) parts.push(reqs + " requests");
    if (failing.length) parts.push("stats failed: " + failing.join(", "));
    if (quarantined.length) parts.push("quarantined: " + quarantined.join(", "));
    summary.textContent = parts.join("  ·  ");
    document.body.dataset.updates = String((Number(document.body.dataset.updates) || 0) + 1);
  }

  async function poll() {
    try {
      const res = await fetch(config.stats, { credentials: "same-origin", cache: "no-store" });
      if (!res.ok) {
        status.textContent = "stats: HTTP " + res.status;
        status.className = "status bad";
      } else {
        render(await res.json());
        status.textContent = "live · every " + config.refresh + " s";
        status.className = "status ok";
      }
    } catch (e) {
      status.textContent = "stats unreachable";
      status.className = "status bad";
    }
    window.setTimeout(poll, config.refresh * 1000);
  }

  window.addEventListener("resize", () => CHARTS.forEach(draw));
  poll();
})();
