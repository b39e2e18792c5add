// Charts: each .chart[data-chart] is drawn by uPlot from the JSON its URL answers
// ({step_s, x: [unix seconds], tiers: {tier: [values]}}), and redrawn every 30 s.
(function () {
  "use strict";
  var COLORS = ["#7c5cd6", "#2d8fd5", "#e0762b", "#1f9d55", "#c2417a", "#6b7385"];

  function fmt(unit, v, step) {
    if (v == null) return "-";
    if (unit !== "usd") return String(Math.round(v * 100) / 100);
    // As many decimals as the axis' step needs (a job costs fractions of a cent), at least two.
    var d = step ? Math.max(2, Math.ceil(-Math.log10(step))) : (v > 0 && v < 0.01 ? 5 : 2);
    return "$" + v.toFixed(Math.min(d, 6));
  }

  function draw(el) {
    fetch(el.dataset.chart, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (d) {
        var names = Object.keys(d.tiers);
        var unit = el.dataset.unit;
        var opts = {
          width: Math.max(300, el.clientWidth), height: 220,
          scales: { x: { time: true } },
          axes: [{}, { size: 70, values: function (u, vals) {
            var step = vals.length > 1 ? Math.abs(vals[1] - vals[0]) : 0;
            return vals.map(function (v) { return fmt(unit, v, step); });
          } }],
          series: [{}].concat(names.map(function (n) {
            var c = COLORS[(d.colors && d.colors[n] != null ? d.colors[n] : 0) % COLORS.length];
            return { label: n, stroke: c, width: 2, fill: c + "18", value: function (u, v) { return fmt(unit, v); } };
          })),
        };
        if (el._plot) el._plot.destroy();
        el.innerHTML = "";
        el._plot = new uPlot(opts, [d.x].concat(names.map(function (n) { return d.tiers[n]; })), el);
        el.dataset.drawn = String(d.x.length);
      })
      .catch(function (e) { el.textContent = "chart unavailable: " + e.message; });
  }

  function all() { document.querySelectorAll(".chart[data-chart]").forEach(draw); }
  all();
  setInterval(all, 30000);
  var resize;
  window.addEventListener("resize", function () { clearTimeout(resize); resize = setTimeout(all, 200); });
})();
