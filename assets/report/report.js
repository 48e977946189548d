// SPDX-License-Identifier: Apache-2.0
// The monitor report's script (include/mixprec/monitor/report.hpp embeds it).
(function () {
'use strict';
// The monitor's report: parses the log embedded above (docs/monitor.md) and
// draws it as inline SVG. Plain ES2015, no libraries; nothing is fetched.
var SCHEMA = 'mixprec.monitor/1';
// The SVG namespace as the HTML parser assigns it, so the page names no URL.
var SVG_NS = (function () {
  var d = document.createElement('div');
  d.innerHTML = '<svg></svg>';
  return d.firstChild.namespaceURI;
})();
var PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b',
               '#e377c2', '#7f7f7f', '#bcbd22'];
var KIND_COLOURS = {
  nonfinite_loss: '#b71c1c', loss_spike: '#e65100', grad_norm_explosion: '#ad1457',
  scale_collapse: '#6a1b9a', underflow: '#1565c0', stalled_updates: '#00838f',
  repeated_overflow: '#c62828', precision_fallback: '#4e342e', moment_lag: '#f9a825',
  update_jump: '#ef6c00'
};
// Viridis' anchor colours, for the heatmap: dark = rare, yellow = common.
var RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function sv(parent, tag, attrs) {
  var e = document.createElementNS(SVG_NS, tag);
  for (var k in attrs) {
    if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
  }
  if (parent) parent.appendChild(e);
  return e;
}
function tip(node, text) {
  var t = document.createElementNS(SVG_NS, 'title');
  t.textContent = text;
  node.appendChild(t);
}
// The log writes a value that is not finite as "nan", "inf" or "-inf", and
// an absent one as null.
function num(v) {
  if (typeof v === 'number') return v;
  if (v === 'inf') return Infinity;
  if (v === '-inf') return -Infinity;
  return NaN;
}
function isNum(v) { return typeof v === 'number' && isFinite(v); }
function groups(s) { return s.replace(/\B(?=(\d{3})+(?!\d))/g, ','); }
function fmt(v) {
  if (v === null || v === undefined) return '\u2014';
  if (typeof v !== 'number') v = num(v);
  if (v !== v) return 'NaN';
  if (v === Infinity) return 'inf';
  if (v === -Infinity) return '-inf';
  if (v === 0) return '0';
  var a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e15) return groups(String(v));
  if (a >= 1e6 || a < 1e-3) return v.toExponential(2).replace(/\.?0+e/, 'e').replace('e+', 'e');
  return String(+v.toPrecision(4));
}
function fmtPct(v) {
  if (!isNum(v)) return fmt(v);
  var p = v * 100;
  if (p === 0) return '0%';
  if (Math.abs(p) < 0.01) return p.toExponential(1) + '%';
  return String(+p.toPrecision(3)) + '%';
}
function fmtScale(v) {
  if (!isNum(v) || v <= 0) return fmt(v);
  var e = Math.log2(v);
  return Number.isInteger(e) ? '2^' + e + ' (' + fmt(v) + ')' : fmt(v);
}
// The same as HTML, with the exponent raised: 2<sup>16</sup> (65,536).
function scaleNode(v) {
  var f = document.createDocumentFragment(), e = isNum(v) && v > 0 ? Math.log2(v) : NaN;
  if (!Number.isInteger(e)) {
    f.appendChild(document.createTextNode(fmt(v)));
    return f;
  }
  f.appendChild(document.createTextNode('2'));
  f.appendChild(el('sup', null, String(e)));
  f.appendChild(document.createTextNode(' (' + fmt(v) + ')'));
  return f;
}

// --- the log -------------------------------------------------------------
function parseLog(text) {
  // The page starts the log on the line after the data block's opening tag.
  if (text.charAt(0) === '\n') text = text.slice(1);
  var lines = text.split('\n'), header = null, records = [];
  for (var i = 0; i < lines.length; ++i) {
    var line = lines[i].trim(), where = 'line ' + (i + 1);
    if (!line) continue;
    var obj;
    try {
      obj = JSON.parse(line);
    } catch (e) {
      throw new Error(where + ' is not valid JSON (' + e.message + ')');
    }
    if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
      throw new Error(where + ' is not a JSON object');
    }
    if (!header) {
      if (obj.type !== 'header') throw new Error(where + ': the log must start with its header record');
      if (obj.schema !== SCHEMA) throw new Error(where + ': schema "' + obj.schema + '" is not ' + SCHEMA);
      if (!Array.isArray(obj.params)) throw new Error(where + ': the header has no "params" list');
      header = obj;
    } else if (obj.type === 'log') {
      checkRecord(obj, where, header);
      records.push(obj);
    } else {
      throw new Error(where + ': unexpected record type "' + obj.type + '"');
    }
  }
  if (!header) throw new Error('the log is empty: it has no header line');
  return { header: header, records: records };
}

function checkRecord(r, where, header) {
  function need(ok, what) {
    if (!ok) throw new Error(where + (isNum(r.step) ? ' (step ' + r.step + ')' : '') + ': ' + what);
  }
  var nbins = (header.bins && header.bins.count) || 64;
  need(isNum(r.step), '"step" is missing or not a number');
  var s = r.steps;
  need(s && typeof s === 'object', '"steps" is missing');
  need(isNum(s.first), '"steps.first" is missing');
  ['loss', 'scale', 'skipped', 'grad_norm'].forEach(function (k) {
    need(Array.isArray(s[k]), '"steps.' + k + '" is not an array');
  });
  var n = s.loss.length;
  need(n > 0, '"steps" holds no step');
  need(s.scale.length === n && s.skipped.length === n && s.grad_norm.length === n,
       'the "steps" arrays differ in length');
  need(s.first + n - 1 === r.step,
       '"steps" runs from ' + s.first + ' over ' + n + ' steps, so its last is not "step"');
  need(Array.isArray(r.params) && r.params.length === header.params.length,
       '"params" has ' + (Array.isArray(r.params) ? r.params.length : 'no') + ' entries, the header lists ' +
       header.params.length);
  r.params.forEach(function (p, i) {
    need(p && Array.isArray(p.hist) && p.hist.length === nbins, 'params[' + i + '].hist is not ' + nbins + ' counts');
  });
  need(r.overall && Array.isArray(r.overall.hist) && r.overall.hist.length === nbins,
       '"overall.hist" is not ' + nbins + ' counts');
  need(r.events === undefined || r.events === null || Array.isArray(r.events), '"events" is not a list');
}

// The log as columns: every step, and every logged step.
function collect(log) {
  var P = log.header.params.length;
  var d = {
    header: log.header, records: log.records.length,
    step: [], loss: [], scale: [], skipped: [], gnorm: [],
    lfirst: [], lstep: [], ratio: [], under: [], sub: [], over: [], hist: [],
    events: [], forecast: null, forecastStep: null
  };
  for (var p = 0; p < P; ++p) d.ratio.push([]);
  log.records.forEach(function (r) {
    var s = r.steps;
    for (var j = 0; j < s.loss.length; ++j) {
      d.step.push(s.first + j);
      d.loss.push(num(s.loss[j]));
      d.scale.push(num(s.scale[j]));
      d.skipped.push(!!s.skipped[j]);
      d.gnorm.push(num(s.grad_norm[j]));
    }
    d.lfirst.push(s.first);
    d.lstep.push(r.step);
    for (var q = 0; q < P; ++q) d.ratio[q].push(num(r.params[q].update_ratio));
    d.under.push(num(r.overall.underflow));
    d.sub.push(num(r.overall.subnormal));
    d.over.push(num(r.overall.overflow));
    d.hist.push(r.overall.hist);
    (r.events || []).forEach(function (e) { if (e && typeof e === 'object') d.events.push(e); });
    if (r.forecast && typeof r.forecast === 'object') {
      d.forecast = r.forecast;
      d.forecastStep = r.step;
    }
  });
  return d;
}

// --- axes ----------------------------------------------------------------
function niceStep(span, count) {
  var raw = span / Math.max(1, count), mag = Math.pow(10, Math.floor(Math.log10(raw))), r = raw / mag;
  return (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10) * mag;
}
function tickText(v, step) {
  if (Math.abs(v) < step * 1e-6) return '0';
  var a = Math.abs(v);
  if (a >= 1e6 || a < 1e-3) return v.toExponential(1).replace('.0e', 'e').replace('e+', 'e');
  var decimals = Math.max(0, Math.min(8, -Math.floor(Math.log10(step) + 1e-9)));
  var t = v.toFixed(decimals);
  return decimals === 0 ? groups(t) : t;
}
// A linear axis over [lo, hi], widened to whole ticks, about `count` of them.
function linearAxis(lo, hi, count, format) {
  if (!isNum(lo) || !isNum(hi)) return null;
  if (hi <= lo) {
    var pad = lo === 0 ? 1 : Math.abs(lo) * 0.05;
    lo -= pad;
    hi += pad;
  }
  var step = niceStep(hi - lo, count);
  var a = Math.floor(lo / step + 1e-9) * step, b = Math.ceil(hi / step - 1e-9) * step, ticks = [];
  for (var k = 0; a + k * step <= b + step * 1e-6; ++k) {
    var v = a + k * step;
    ticks.push({ v: v, label: (format || tickText)(v, step) });
  }
  return { lo: a, hi: b, ticks: ticks, pos: function (x) { return (x - a) / (b - a); } };
}
// A log axis (base 2 or 10) over the positive finite values, whole powers at
// both ends; null when there are none.
function logAxis(values, base, count) {
  var lo = Infinity, hi = -Infinity, L = Math.log(base);
  values.forEach(function (v) {
    if (isNum(v) && v > 0) {
      var e = Math.log(v) / L;
      if (e < lo) lo = e;
      if (e > hi) hi = e;
    }
  });
  if (lo === Infinity) return null;
  var a = Math.floor(lo + 1e-9), b = Math.ceil(hi - 1e-9);
  if (b <= a) {
    a -= 1;
    b += 1;
  }
  var step = Math.max(1, Math.ceil((b - a) / count));
  a = Math.floor(a / step) * step;
  b = Math.ceil(b / step) * step;
  // Decimals where every tick is between 0.01 and 1000, powers otherwise.
  var plain = base === 10 && a >= -2 && b <= 3, ticks = [];
  for (var e = a; e <= b; e += step) {
    var lab = plain ? String(Math.pow(10, e)) : { base: String(base), exp: String(e) };
    ticks.push({ v: Math.pow(base, e), label: lab });
  }
  return { lo: a, hi: b, ticks: ticks, pos: function (v) { return v > 0 ? (Math.log(v) / L - a) / (b - a) : NaN; } };
}

// SVG text; a label may be {base, exp, after} for a power such as 2^-24.
function label(parent, x, y, lab, attrs) {
  attrs = Object.assign({ x: x, y: y }, attrs || {});
  if (attrs.fill) {
    // As a style: the stylesheet's fill for svg text outranks an attribute.
    attrs.style = 'fill:' + attrs.fill;
    delete attrs.fill;
  }
  var t = sv(parent, 'text', attrs);
  if (typeof lab === 'string') {
    t.textContent = lab;
  } else {
    t.appendChild(document.createTextNode(lab.base));
    sv(t, 'tspan', { dy: '-0.5em', 'font-size': '0.78em' }).textContent = lab.exp;
    if (lab.after) sv(t, 'tspan', { dy: '0.5em' }).textContent = lab.after;
  }
  return t;
}

// A plot area with its grid, ticks and axis titles; returns the mapping from
// data to pixels.
function frame(card, opt) {
  var W = opt.width, H = opt.height, m = opt.margin;
  var s = sv(null, 'svg', { width: W, height: H, viewBox: '0 0 ' + W + ' ' + H, role: 'img' });
  card.appendChild(s);
  var pw = W - m.l - m.r, ph = H - m.t - m.b;
  var f = {
    svg: s, x0: m.l, x1: m.l + pw, y0: m.t, y1: m.t + ph,
    px: function (v) { return m.l + opt.x.pos(v) * pw; },
    py: opt.y ? function (v) { return m.t + (1 - opt.y.pos(v)) * ph; } : null
  };
  sv(s, 'rect', { x: m.l, y: m.t, width: pw, height: ph, fill: '#fbfcfd', stroke: '#c9d0d9' });
  if (opt.y) {
    opt.y.ticks.forEach(function (t) {
      var y = f.py(t.v);
      sv(s, 'line', { x1: m.l, x2: m.l + pw, y1: y, y2: y, stroke: '#e3e7ec' });
      label(s, m.l - 6, y + 4, t.label, { 'text-anchor': 'end' });
    });
  }
  opt.x.ticks.forEach(function (t) {
    var x = f.px(t.v);
    if (opt.xGrid !== false) sv(s, 'line', { x1: x, x2: x, y1: m.t, y2: m.t + ph, stroke: '#eef1f4' });
    sv(s, 'line', { x1: x, x2: x, y1: m.t + ph, y2: m.t + ph + 4, stroke: '#9aa5b1' });
    label(s, x, m.t + ph + 16, t.label, { 'text-anchor': 'middle' });
  });
  if (opt.xTitle) label(s, m.l + pw / 2, H - 3, opt.xTitle, { 'text-anchor': 'middle', 'class': 'title' });
  if (opt.yTitle) {
    label(s, 0, 0, opt.yTitle, {
      'text-anchor': 'middle', 'class': 'title',
      transform: 'translate(13,' + (m.t + ph / 2) + ') rotate(-90)'
    });
  }
  return f;
}

// A polyline through the finite points, broken where a value is not finite
// (or not positive on a log axis). Past a few points per pixel it keeps each
// pixel column's extremes, which looks the same and keeps the SVG small.
function linePath(xs, ys, f, stepped) {
  var parts = [], pen = false, n = xs.length;
  var thin = n > 3 * (f.x1 - f.x0);
  function at(X, Y) {
    if (!pen) parts.push('M' + X.toFixed(1) + ' ' + Y.toFixed(1));
    else if (stepped && !thin) parts.push('H' + X.toFixed(1) + 'V' + Y.toFixed(1));
    else parts.push('L' + X.toFixed(1) + ' ' + Y.toFixed(1));
    pen = true;
  }
  if (!thin) {
    for (var i = 0; i < n; ++i) {
      var X = f.px(xs[i]), Y = f.py(ys[i]);
      if (isNum(X) && isNum(Y)) at(X, Y);
      else pen = false;
    }
    return parts.join('');
  }
  var col = null, lo = null, hi = null, broke = false;
  function flush() {
    if (col === null) return;
    if (lo !== null) {
      at(col, lo[0] < hi[0] ? lo[1] : hi[1]);
      at(col, lo[0] < hi[0] ? hi[1] : lo[1]);
    }
    if (broke) pen = false;
  }
  for (var k = 0; k < n; ++k) {
    var x = Math.round(f.px(xs[k])), y = f.py(ys[k]);
    if (x !== col) {
      flush();
      col = x;
      lo = hi = null;
      broke = false;
    }
    if (!isNum(y)) {
      broke = true;
      continue;
    }
    if (lo === null || y > lo[1]) lo = [k, y];
    if (hi === null || y < hi[1]) hi = [k, y];
  }
  flush();
  return parts.join('');
}

function ramp(t) {
  t = Math.max(0, Math.min(1, t));
  var x = t * (RAMP.length - 1), i = Math.min(RAMP.length - 2, Math.floor(x)), w = x - i;
  var a = RAMP[i], b = RAMP[i + 1];
  return 'rgb(' + Math.round(a[0] + (b[0] - a[0]) * w) + ',' + Math.round(a[1] + (b[1] - a[1]) * w) + ',' +
         Math.round(a[2] + (b[2] - a[2]) * w) + ')';
}

function legend(card, items) {
  var box = el('div', 'legend');
  items.forEach(function (it) {
    var key = el('span', 'key'), sw = el('span', 'sw' + (it.shape ? ' ' + it.shape : ''));
    if (it.shape === 'tri') sw.style.borderTopColor = it.colour;
    else sw.style.background = it.colour;
    key.appendChild(sw);
    key.appendChild(document.createTextNode(it.label));
    box.appendChild(key);
  });
  card.appendChild(box);
}

function card(parent, title, note, full) {
  var c = el('section', 'card' + (full ? ' full' : ''));
  c.appendChild(el('h2', null, title));
  if (note) c.appendChild(el('p', 'note', note));
  parent.appendChild(c);
  return c;
}
function plotWidth(c) { return Math.max(320, Math.floor(c.getBoundingClientRect().width) - 30); }
function nothing(c, why) {
  c.appendChild(el('p', 'empty', why));
  return false;
}
// --- charts ----------------------------------------------------------------
// The x axis every chart shares: the steps the log covers.
function stepAxis(d, width) {
  return linearAxis(d.lfirst[0] - 1, d.lstep[d.lstep.length - 1], Math.max(3, Math.round(width / 110)));
}

// spec: title, note, y ('linear', 'log2', 'log10'), yTitle, yFormat, zeroBased,
// series [{label, colour, xs, ys, stepped, dots, width}], markers [{x, y, colour,
// text, tip}] (y null: a marker above the plot for a value that is not
// finite), legend (extra legend items), full, height.
function lineChart(parent, d, spec) {
  var c = card(parent, spec.title, spec.note, spec.full);
  var values = [], hlines = spec.hlines || [];
  spec.series.forEach(function (s) { values = values.concat(s.ys); });
  hlines.forEach(function (h) { values.push(h.y); });
  var yAxis;
  if (spec.y === 'linear') {
    var lo = Infinity, hi = -Infinity;
    values.forEach(function (v) {
      if (isNum(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    });
    if (lo === Infinity) return nothing(c, 'Nothing to draw: no finite values.');
    if (spec.zeroBased) lo = Math.min(lo, 0);
    yAxis = linearAxis(lo, hi, 5, spec.yFormat);
  } else {
    yAxis = logAxis(values, spec.y === 'log2' ? 2 : 10, 6);
    if (!yAxis) return nothing(c, 'Nothing to draw: no finite positive values.');
  }
  var W = plotWidth(c), markers = spec.markers || [];
  var above = markers.some(function (m) { return m.y === null; });  // markers above the plot need room
  var margin = spec.margin || { l: 64, r: 14, t: above ? 24 : 10, b: 36 };
  var f = frame(c, {
    width: W, height: spec.height || 260, margin: margin, x: stepAxis(d, W - margin.l - margin.r), y: yAxis,
    xTitle: 'step', yTitle: spec.yTitle
  });
  hlines.forEach(function (h) {
    var Y = f.py(h.y);
    sv(f.svg, 'line', {
      x1: f.x0, x2: f.x1, y1: Y, y2: Y, stroke: h.colour, 'stroke-width': 1.2, 'stroke-dasharray': '6 4'
    });
    label(f.svg, f.x0 + 6, Y - 5, h.text, { fill: h.colour, 'class': 'mark' });
  });
  spec.series.forEach(function (s) {
    sv(f.svg, 'path', {
      d: linePath(s.xs, s.ys, f, s.stepped), fill: 'none', stroke: s.colour,
      'stroke-width': s.width || 1.6, 'stroke-linejoin': 'round'
    });
    if (s.dots) {
      for (var i = 0; i < s.xs.length; ++i) {
        var X = f.px(s.xs[i]), Y = f.py(s.ys[i]);
        if (!isNum(X) || !isNum(Y)) continue;
        tip(sv(f.svg, 'circle', { cx: X, cy: Y, r: 2.6, fill: s.colour }),
            s.label + ' at step ' + s.xs[i] + ': ' + (spec.yFormat ? spec.yFormat(s.ys[i]) : fmt(s.ys[i])));
      }
    }
  });
  // Guide lines down from the markers while they are few enough to tell apart.
  var labelled = 0, guides = markers.filter(function (m) { return m.y === null; }).length <= 40;
  markers.forEach(function (m) {
    var X = f.px(m.x), node;
    if (!isNum(X)) return;
    if (m.y === null) {
      var top = f.y0 - 12;
      node = sv(f.svg, 'path', {
        d: 'M' + (X - 5) + ' ' + top + 'L' + (X + 5) + ' ' + top + 'L' + X + ' ' + (top + 9) + 'Z', fill: m.colour
      });
      if (guides) {
        sv(f.svg, 'line', {
          x1: X, x2: X, y1: f.y0, y2: f.y1, stroke: m.colour, 'stroke-dasharray': '3 3', opacity: 0.55
        });
      }
      if (m.text && labelled++ < 8) {
        label(f.svg, X + 7, top + 8, m.text, { 'class': 'mark', fill: m.colour });
      }
    } else {
      var Y = f.py(m.y);
      if (!isNum(Y)) return;
      node = sv(f.svg, 'circle', { cx: X, cy: Y, r: 3.8, fill: m.colour, stroke: '#fff', 'stroke-width': 1 });
    }
    if (m.tip) tip(node, m.tip);
  });
  var items = spec.series.map(function (s) { return { label: s.label, colour: s.colour }; });
  legend(c, items.concat(spec.legend || []));
  return true;
}

function lossChart(parent, d) {
  var markers = [], bad = 0;
  d.loss.forEach(function (v, i) {
    if (isNum(v)) return;
    ++bad;
    markers.push({
      x: d.step[i], y: null, colour: '#c62828', text: fmt(v), tip: 'step ' + d.step[i] + ': loss ' + fmt(v)
    });
  });
  return lineChart(parent, d, {
    title: 'Loss', note: 'Per step, as the trainer gave it.' + (bad ? ' \u25BC: a loss that is not finite.' : ''),
    y: 'linear', yTitle: 'loss',
    series: [{ label: 'loss', colour: PALETTE[0], xs: d.step, ys: d.loss, width: 1.4 }],
    markers: markers,
    legend: bad ? [{ label: 'NaN or inf loss (' + bad + ')', colour: '#c62828', shape: 'tri' }] : []
  });
}

function scaleChart(parent, d) {
  var markers = [], skipped = 0;
  d.skipped.forEach(function (s, i) {
    if (!s) return;
    ++skipped;
    markers.push({
      x: d.step[i], y: d.scale[i], colour: '#d62728',
      tip: 'step ' + d.step[i] + ' skipped at scale ' + fmtScale(d.scale[i])
    });
  });
  return lineChart(parent, d, {
    title: 'Loss scale',
    note: 'The scale each step\u2019s gradients carried (log\u2082 axis); a dot marks a skipped step.',
    y: 'log2', yTitle: 'loss scale',
    series: [{ label: 'loss scale', colour: PALETTE[2], xs: d.step, ys: d.scale, stepped: true, width: 1.8 }],
    markers: markers,
    legend: [{ label: 'skipped step (' + skipped + ')', colour: '#d62728', shape: 'dot' }]
  });
}

function gradNormChart(parent, d) {
  var markers = [], bad = 0;
  d.gnorm.forEach(function (v, i) {
    if (isNum(v)) return;
    ++bad;
    markers.push({
      x: d.step[i], y: null, colour: '#ef6c00', tip: 'step ' + d.step[i] + ': gradient norm ' + fmt(v)
    });
  });
  return lineChart(parent, d, {
    title: 'Gradient norm', note: 'L2 norm of all unscaled gradients, per step (log axis).' +
      (bad ? ' \u25BC: not finite (the step was skipped).' : ''),
    y: 'log10', yTitle: '\u2016g\u2016\u2082',
    series: [{ label: 'global gradient norm', colour: PALETTE[3], xs: d.step, ys: d.gnorm, width: 1.3 }],
    markers: markers,
    legend: bad ? [{ label: 'inf or NaN (' + bad + ')', colour: '#ef6c00', shape: 'tri' }] : []
  });
}

function ratioChart(parent, d) {
  var params = d.header.params;
  return lineChart(parent, d, {
    title: 'Update ratio per parameter',
    note: '\u2016\u0394w\u2016 / \u2016w\u2016 of the fp32 masters at each logged step (log axis); ' +
          'a skipped step\u2019s 0 is left out.',
    y: 'log10', yTitle: 'update ratio',
    series: params.map(function (p, i) {
      return {
        label: String(p.name), colour: PALETTE[i % PALETTE.length], xs: d.lstep, ys: d.ratio[i],
        dots: d.lstep.length <= 200
      };
    })
  });
}

function sharesChart(parent, d, margin) {
  // The log's header does not say the detectors' underflow threshold; the
  // whole-model underflow events do.
  var threshold = null;
  d.events.forEach(function (e) {
    var model = e.param === null || e.param === undefined;
    if (e.kind === 'underflow' && model && isNum(num(e.threshold))) threshold = num(e.threshold);
  });
  return lineChart(parent, d, {
    hlines: threshold === null ? [] : [{
      y: threshold, colour: '#c62828', text: 'underflow threshold ' + fmtPct(threshold) + ' (from the events)'
    }],
    title: 'fp16 shares of the gradients',
    note: 'Share of all gradient elements, as stored (multiplied by the loss scale), at each logged step: ' +
          'lost in fp16 (zero or below 2\u207B\u00B2\u2074), fp16 subnormal [2\u207B\u00B2\u2074, 2\u207B\u00B9\u2074), ' +
          'overflow (2\u00B9\u2076 and up, or not finite).',
    y: 'linear', yTitle: 'share', zeroBased: true, full: true, height: 230, margin: margin,
    yFormat: function (v, step) {
      // A tick (with its step): as many decimals as the step needs; a value: fmtPct.
      if (step === undefined) return fmtPct(v);
      return (v * 100).toFixed(Math.max(0, Math.min(6, -Math.floor(Math.log10(step * 100) + 1e-9)))) + '%';
    },
    series: [
      { label: 'underflow (lost)', colour: '#c62828', xs: d.lstep, ys: d.under, dots: d.lstep.length <= 200 },
      { label: 'subnormal', colour: '#ef8f00', xs: d.lstep, ys: d.sub, dots: d.lstep.length <= 200 },
      { label: 'overflow', colour: '#6a1b9a', xs: d.lstep, ys: d.over, dots: d.lstep.length <= 200 }
    ]
  });
}

// The exponent histogram over time: a column per logged step (covering the
// steps since the previous one), a row per bin, colour = share of elements
// on a log scale.
function heatmap(parent, d, margin) {
  var c = card(parent, 'Exponent histogram of the gradients',
    'All gradients as stored (multiplied by the loss scale): a column per logged step, a row per power of two ' +
    '(the lowest row also holds everything smaller, the highest everything from 2\u00B9\u2076 up); ' +
    'colour: share of elements.',
    true);
  var bins = d.header.bins || {}, nb = bins.count || 64, offset = bins.offset || 46;
  function get(key, fallback) { return isNum(bins[key]) ? bins[key] : fallback; }
  var minE = get('min_exponent', -45), maxE = get('max_exponent', 16);
  var zeroBin = get('zero', 0), nfBin = get('nonfinite', nb - 1);
  var rows = maxE - minE + 1, rowH = 5, gap = 7;
  var W = plotWidth(c), H = margin.t + rowH + gap + rows * rowH + gap + rowH + margin.b;
  var xAxis = stepAxis(d, W - margin.l - margin.r);
  var f = frame(c, {
    width: W, height: H, margin: margin, x: xAxis, y: null, xTitle: 'step', yTitle: '|gradient| \u00D7 scale',
    xGrid: false
  });
  var s = f.svg, yTopRange = f.y0 + rowH + gap;
  // The top of a bin's row: the non-finite row on top, then 2^maxE down to
  // 2^minE, then the zeros.
  function rowTop(b) {
    if (b === nfBin) return f.y0;
    if (b === zeroBin) return yTopRange + rows * rowH + gap;
    return yTopRange + (maxE - (b - offset)) * rowH;
  }
  sv(s, 'rect', { x: f.x0, y: yTopRange - gap / 2, width: f.x1 - f.x0, height: gap / 2, fill: '#fff' });
  // Columns: one per record, or per pixel when there are more records than pixels.
  var cols = [];
  for (var k = 0; k < d.lstep.length; ++k) {
    var x0 = f.px(d.lfirst[k] - 1), x1 = f.px(d.lstep[k]), h = d.hist[k], total = 0;
    for (var b = 0; b < nb; ++b) total += h[b];
    if (!(total > 0)) continue;
    var last = cols[cols.length - 1];
    if (last && x1 - last.x0 < 1.5) {
      for (var b2 = 0; b2 < nb; ++b2) last.share[b2] += h[b2] / total;
      last.x1 = x1;
      last.n += 1;
      last.to = d.lstep[k];
    } else {
      var share = [];
      for (var b3 = 0; b3 < nb; ++b3) share.push(h[b3] / total);
      cols.push({ x0: x0, x1: x1, share: share, n: 1, from: d.lfirst[k], to: d.lstep[k] });
    }
  }
  var withTips = cols.length <= 400;
  cols.forEach(function (col) {
    for (var b = 0; b < nb; ++b) {
      var v = col.share[b] / col.n;
      if (!(v > 0)) continue;
      var r = sv(s, 'rect', {
        // Half a pixel wider than the column: no anti-aliased seams between them.
        x: col.x0.toFixed(2), y: rowTop(b), width: Math.max(0.8, col.x1 - col.x0 + 0.5).toFixed(2), height: rowH,
        fill: ramp((Math.log10(v) + 5) / 5)
      });
      if (withTips) {
        var what = b === zeroBin ? 'zeros' : b === nfBin ? 'inf or NaN' :
          '2^' + (b - offset) + ' \u2264 |g| < 2^' + (b - offset + 1);
        tip(r, 'steps ' + col.from + '\u2013' + col.to + ', ' + what + ': ' + fmtPct(v));
      }
    }
  });
  // Row labels: every fifth power, the zeros and the non-finite values.
  // (Not the lowest edge: that row holds everything smaller.)
  for (var e = minE + 1; e < maxE; ++e) {
    if (e % 5 !== 0) continue;
    var y = rowTop(e + offset) + rowH;
    sv(s, 'line', { x1: f.x0 - 4, x2: f.x0, y1: y, y2: y, stroke: '#9aa5b1' });
    label(s, f.x0 - 6, y + 4, { base: '2', exp: String(e) }, { 'text-anchor': 'end' });
  }
  label(s, f.x0 - 6, rowTop(zeroBin) + rowH, '0', { 'text-anchor': 'end' });
  label(s, f.x0 - 6, rowTop(nfBin) + rowH, 'inf/NaN', { 'text-anchor': 'end' });
  // fp16's boundaries, at the lower edge of their bins.
  [
    { e: -24, colour: '#d32f2f', text: ' fp16 smallest subnormal' },
    { e: -14, colour: '#ef6c00', text: ' fp16 smallest normal' },
    { e: 16, colour: '#d32f2f', text: ' fp16 overflow (max 65504)' }
  ].forEach(function (line) {
    if (line.e < minE || line.e > maxE) return;
    var y = rowTop(line.e + offset) + rowH;
    sv(s, 'line', {
      x1: f.x0, x2: f.x1 + 6, y1: y, y2: y, stroke: line.colour, 'stroke-width': 1.6, 'stroke-dasharray': '6 3'
    });
    label(s, f.x1 + 9, y + 4, { base: '2', exp: String(line.e), after: line.text },
          { fill: line.colour, 'class': 'mark' });
  });
  // The colour bar, above the plot on the right.
  var barW = 220, bx = f.x1 - barW, by = 6;
  for (var i = 0; i < 60; ++i) {
    sv(s, 'rect', {
      x: (bx + i * barW / 60).toFixed(2), y: by, width: (barW / 60 + 0.3).toFixed(2), height: 9, fill: ramp(i / 59)
    });
  }
  ['0.001%', '0.01%', '0.1%', '1%', '10%', '100%'].forEach(function (t, j) {
    label(s, bx + j * barW / 5, by + 21, t, { 'text-anchor': 'middle' });
  });
  sv(s, 'rect', { x: bx - 52, y: by, width: 12, height: 9, fill: '#fbfcfd', stroke: '#c9d0d9' });
  label(s, bx - 36, by + 9, 'none', {});
  label(s, bx - 64, by + 9, 'share of elements:', { 'text-anchor': 'end', 'class': 'title' });
  return true;
}
// --- text panels -------------------------------------------------------------
function stat(parent, value, key, tone) {
  var s = el('div', 'stat' + (tone ? ' ' + tone : '')), v = el('div', 'v');
  if (typeof value === 'string') v.textContent = value;
  else v.appendChild(value);
  s.appendChild(v);
  s.appendChild(el('div', 'k', key));
  parent.appendChild(s);
}

function overview(parent, d) {
  var c = card(parent, 'Overview', null, true), row = el('div', 'overview');
  c.appendChild(row);
  var left = el('div'), right = el('div');
  row.appendChild(left);
  row.appendChild(right);
  left.appendChild(el('h3', null, 'The run'));
  var stats = el('div', 'stats');
  left.appendChild(stats);
  var n = d.step.length, skipped = 0, badLoss = 0, lastLoss = NaN;
  for (var i = 0; i < n; ++i) {
    if (d.skipped[i]) ++skipped;
    if (!isNum(d.loss[i])) ++badLoss;
    else lastLoss = d.loss[i];
  }
  stat(stats, fmt(d.lstep[d.lstep.length - 1]), 'steps monitored');
  stat(stats, fmt(d.records), 'logged steps');
  stat(stats, fmt(skipped) + (n ? ' (' + fmtPct(skipped / n) + ')' : ''), 'skipped steps', skipped ? 'warn' : 'good');
  stat(stats, fmt(badLoss), 'NaN/inf losses', badLoss ? 'bad' : 'good');
  stat(stats, fmt(lastLoss), 'last finite loss');
  stat(stats, scaleNode(d.scale[n - 1]), 'last loss scale');
  stat(stats, fmt(d.events.length), 'events', d.events.length ? 'warn' : 'good');

  var fc = d.forecast;
  right.appendChild(el('h3', null, fc ? 'Last forecast (step ' + fmt(d.forecastStep) + ')' : 'Forecast'));
  var fstats = el('div', 'stats');
  right.appendChild(fstats);
  if (!fc) {
    fstats.appendChild(el('div', 'empty', 'The log holds no forecast.'));
    return;
  }
  // Absent: the trend does not point that way; 0: already there.
  function steps(v) {
    if (v === null || v === undefined) return 'not in sight';
    return num(v) === 0 ? 'reached' : fmt(num(v)) + ' steps';
  }
  var toMin = num(fc.steps_to_min_scale), toUnder = num(fc.steps_to_underflow);
  stat(fstats, steps(fc.steps_to_min_scale), 'to the minimum loss scale', isNum(toMin) ? 'bad' : null);
  stat(fstats, steps(fc.steps_to_underflow), 'to the underflow threshold',
       isNum(toUnder) ? (toUnder === 0 ? 'bad' : 'warn') : null);
  var slope = fc.loss_slope === null || fc.loss_slope === undefined ? '\u2014' : fmt(num(fc.loss_slope));
  stat(fstats, slope, 'loss slope per step');
  stat(fstats, fc.diverging ? 'yes' : 'no', 'diverging', fc.diverging ? 'bad' : 'good');
}

function eventsTable(parent, d) {
  var c = card(parent, 'Events (' + d.events.length + ')',
    'What the detectors found, oldest first. Parameter \u201C\u2014\u201D: the whole model.', true);
  if (!d.events.length) return nothing(c, 'No events: the detectors found nothing.');
  var wrap = el('div', 'scroll'), t = el('table'), head = el('tr');
  ['step', 'kind', 'parameter', 'value', 'threshold', 'message', 'suggestion'].forEach(function (h) {
    head.appendChild(el('th', null, h));
  });
  var thead = el('thead');
  thead.appendChild(head);
  t.appendChild(thead);
  var body = el('tbody');
  d.events.forEach(function (e) {
    var tr = el('tr');
    tr.appendChild(el('td', 'num', fmt(e.step)));
    var kindCell = el('td', 'nowrap'), badge = el('span', 'kind', e.kind);
    badge.style.background = KIND_COLOURS[e.kind] || '#546e7a';
    kindCell.appendChild(badge);
    tr.appendChild(kindCell);
    var whole = e.param === null || e.param === undefined || e.param === '';
    tr.appendChild(el('td', 'nowrap', whole ? '\u2014' : String(e.param)));
    tr.appendChild(el('td', 'num', fmt(e.value)));
    tr.appendChild(el('td', 'num', fmt(e.threshold)));
    tr.appendChild(el('td', null, e.message || ''));
    tr.appendChild(el('td', null, e.suggestion || ''));
    body.appendChild(tr);
  });
  t.appendChild(body);
  wrap.appendChild(t);
  c.appendChild(wrap);
  return true;
}

function runInfo(box, h) {
  box.textContent = '';
  function item(k, v) {
    var s = el('span');
    s.appendChild(el('span', 'k', k));
    s.appendChild(typeof v === 'string' ? document.createTextNode(v) : v);
    box.appendChild(s);
  }
  item('optimizer', h.optimizer === undefined ? '\u2014' : String(h.optimizer));
  item('device', h.device === undefined ? '\u2014' : String(h.device));
  item('scaling', h.scaling === undefined ? '\u2014' : String(h.scaling));
  item('initial scale', scaleNode(num(h.init_scale)));
  item('scale range', '[' + fmt(h.min_scale) + ', ' + fmt(h.max_scale) + ']');
  item('logged every', fmt(h.every) + ' steps');
  var total = 0;
  h.params.forEach(function (p) { total += isNum(p.numel) ? p.numel : 0; });
  item('parameters', fmt(h.params.length) + ' (' + fmt(total) + ' elements)');
  var list = el('div', 'params');
  h.params.forEach(function (p) {
    var chip = el('span', 'chip', String(p.name) + ' ');
    chip.appendChild(el('span', 'd', fmt(p.numel) + ' \u00B7 ' + String(p.dtype)));
    list.appendChild(chip);
  });
  if (h.params.length > 12) {
    var det = el('details');
    det.appendChild(el('summary', null, 'the ' + h.params.length + ' parameters'));
    det.appendChild(list);
    det.style.flexBasis = '100%';
    box.appendChild(det);
  } else {
    box.appendChild(list);
  }
}

// --- the page ----------------------------------------------------------------
var root = document.getElementById('report'), statusEl = document.getElementById('render-status');
var data = null;

function fail(message) {
  root.textContent = '';
  var b = el('div', 'banner error', 'This report cannot be drawn: ' + message);
  root.appendChild(b);
  statusEl.textContent = 'error: ' + message;
  document.body.dataset.rendered = 'error';
}

function draw() {
  root.textContent = '';
  overview(root, data);
  var charts = 0;
  if (lossChart(root, data)) ++charts;
  if (scaleChart(root, data)) ++charts;
  if (gradNormChart(root, data)) ++charts;
  if (ratioChart(root, data)) ++charts;
  // The two full-width charts share their margins, so their steps line up.
  var margin = { l: 64, r: 200, t: 30, b: 36 };
  if (heatmap(root, data, margin)) ++charts;
  if (sharesChart(root, data, { l: margin.l, r: margin.r, t: 10, b: 36 })) ++charts;
  eventsTable(root, data);
  return charts;
}

function render() {
  try {
    var log = parseLog(document.getElementById('monitor-log').textContent);
    runInfo(document.getElementById('run-info'), log.header);
    if (!log.records.length) {
      root.textContent = '';
      root.appendChild(el('div', 'banner', 'The log has its header but no logged step yet: the first record is ' +
                                            'written after ' + fmt(log.header.every) + ' steps.'));
      statusEl.textContent = '0 charts';
      statusEl.dataset.charts = '0';
      document.body.dataset.rendered = 'ok';
      return;
    }
    data = collect(log);
    var charts = draw();
    statusEl.textContent = charts + ' charts';
    statusEl.dataset.charts = String(charts);
    document.body.dataset.rendered = 'ok';
  } catch (e) {
    fail(e && e.message ? e.message : String(e));
  }
}

render();
// Redraw at the new width when the window is resized.
var lastWidth = window.innerWidth, pending = null;
window.addEventListener('resize', function () {
  if (!data || window.innerWidth === lastWidth) return;
  lastWidth = window.innerWidth;
  clearTimeout(pending);
  pending = setTimeout(function () {
    try {
      draw();
    } catch (e) {
      fail(e && e.message ? e.message : String(e));
    }
  }, 150);
});
})();
