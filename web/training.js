// A loss chart on the CogVXTrainLora node: the raw training loss (light), its running mean (dark) and the fixed-noise
// validation loss (red dots), with the step count.
//
// Data arrives two ways: live, one `cogvx.train.progress` message per step ({node, step, loss, mean, total}, sent by
// nodes/training.py through nodes/host.py), and after each queue run as the node's ui output (`cogvx_loss`: the whole
// history as [step, loss] pairs, `cogvx_validation`, `cogvx_total`, `cogvx_mean`), which replaces what the live
// messages drew. The label's loss is the server's running mean (`mean`), so it equals the node's text; everything is
// drawn inside the chart's rectangle.
// Only the classic extension API is used (registerExtension, beforeRegisterNodeDef, onNodeCreated, onExecuted, a
// custom widget with draw/computeSize), each chained onto the original; without it the file logs one warning.

import { chain, fitNode, resolve } from "./common.js";

const NODE_ID = "CogVXTrainLora";
const WIDGET_NAME = "cogvx_loss_chart";
const CHART_HEIGHT = 170;
const MAX_POINTS = 4000;

// ---- pure helpers (exported for tests) ---------------------------------------------------------------------------

// Bias-corrected exponential moving average; null (a skipped step) leaves it unchanged.
export function runningMean(values, smoothing = 0.9) {
  const out = [];
  let avg = 0;
  let weight = 0;
  for (const v of values) {
    if (v != null && Number.isFinite(v)) {
      avg = smoothing * avg + (1 - smoothing) * v;
      weight = smoothing * weight + (1 - smoothing);
    }
    out.push(weight ? avg / weight : null);
  }
  return out;
}

// The chart's state, kept on the node: points [[step, loss|null]], validation [[step, loss]], total steps, and the
// server's running mean of the loss at the latest step (null: not known yet).
export function emptyChart() {
  return { points: [], validation: [], total: 0, mean: null };
}

export function addPoint(chart, step, loss, total, mean = null) {
  const last = chart.points[chart.points.length - 1];
  if (last && last[0] >= step) chart.points = chart.points.filter((p) => p[0] < step); // a restarted run
  chart.points.push([step, loss == null || !Number.isFinite(loss) ? null : loss]);
  if (chart.points.length > MAX_POINTS) chart.points = chart.points.filter((_, i) => i % 2 === 0);
  if (total) chart.total = total;
  chart.mean = mean ?? null;
  return chart;
}

export function setHistory(chart, message) {
  if (Array.isArray(message?.cogvx_loss)) chart.points = message.cogvx_loss.map(([s, l]) => [s, l ?? null]);
  if (Array.isArray(message?.cogvx_validation)) chart.validation = message.cogvx_validation.map(([s, l]) => [s, l]);
  if (Array.isArray(message?.cogvx_total) && message.cogvx_total.length) chart.total = message.cogvx_total[0];
  if (Array.isArray(message?.cogvx_mean)) chart.mean = message.cogvx_mean[0] ?? null;
  return chart;
}

// Maps data to pixels inside rect {x, y, w, h}; log scale when the losses span more than a decade.
export function scales(chart, rect) {
  const values = chart.points.map((p) => p[1]).concat(chart.validation.map((v) => v[1]))
    .filter((v) => v != null && Number.isFinite(v));
  if (!values.length) return null;
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const log = lo > 0 && hi / lo > 10;
  const f = log ? Math.log10 : (v) => v;
  let yLo = f(lo);
  let yHi = f(hi);
  if (yHi - yLo < 1e-12) {
    yLo -= 0.5;
    yHi += 0.5;
  }
  const first = chart.points.length ? chart.points[0][0] : 1;
  const last = Math.max(chart.total || 0, ...chart.points.map((p) => p[0]), ...chart.validation.map((v) => v[0]), first + 1);
  return {
    log, lo, hi, first, last,
    x: (step) => rect.x + ((step - first) / (last - first)) * rect.w,
    y: (v) => rect.y + (1 - (f(v) - yLo) / (yHi - yLo)) * rect.h,
  };
}

function polyline(ctx, pts, colour, width) {
  ctx.strokeStyle = colour;
  ctx.lineWidth = width;
  ctx.beginPath();
  let open = false;
  for (const p of pts) {
    if (p == null) {
      open = false;
      continue;
    }
    if (open) ctx.lineTo(p[0], p[1]);
    else ctx.moveTo(p[0], p[1]);
    open = true;
  }
  ctx.stroke();
}

export function drawChart(ctx, rect, chart) {
  ctx.save();
  ctx.beginPath();
  ctx.rect(rect.x, rect.y, rect.w, rect.h);
  ctx.clip(); // labels and lines never spill outside the chart (nor the node)
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(rect.x, rect.y, rect.w, rect.h);
  ctx.font = "11px sans-serif";
  const s = scales(chart, { x: rect.x + 42, y: rect.y + 16, w: rect.w - 50, h: rect.h - 30 });
  if (!s) {
    ctx.fillStyle = "#888";
    ctx.fillText("loss: no steps yet", rect.x + 8, rect.y + 16);
    ctx.restore();
    return s;
  }
  ctx.fillStyle = "#aaa";
  ctx.fillText(s.hi.toPrecision(3), rect.x + 2, rect.y + 20);
  ctx.fillText(s.lo.toPrecision(3), rect.x + 2, rect.y + rect.h - 14);
  const raw = chart.points.map(([step, v]) => (v == null ? null : [s.x(step), s.y(v)]));
  const mean = runningMean(chart.points.map((p) => p[1]));
  polyline(ctx, raw, "#5a7bb5", 1);
  polyline(ctx, chart.points.map(([step], i) => (mean[i] == null ? null : [s.x(step), s.y(mean[i])])), "#9fc3ff", 2);
  ctx.fillStyle = "#ff5a5a";
  for (const [step, v] of chart.validation) {
    ctx.beginPath();
    ctx.arc(s.x(step), s.y(v), 3, 0, 2 * Math.PI);
    ctx.fill();
  }
  const lastPoint = chart.points[chart.points.length - 1];
  const lastMean = chart.mean ?? mean[mean.length - 1];
  let label = `step ${lastPoint ? lastPoint[0] : 0}/${chart.total || "?"}`;
  if (lastMean != null) label += `  loss ${lastMean.toFixed(4)}`;
  if (chart.validation.length) label += `  val ${chart.validation[chart.validation.length - 1][1].toFixed(4)}`;
  ctx.fillStyle = "#ddd";
  ctx.fillText(label, rect.x + 44, rect.y + 11);
  ctx.restore();
  return s;
}

// ---- the extension -----------------------------------------------------------------------------------------------

function chartWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (widget) return widget;
  widget = {
    name: WIDGET_NAME,
    type: "cogvx_chart",
    value: null,
    serialize: false, // display only: never in the saved workflow or the API prompt
    options: { serialize: false },
    draw(ctx, n, width, y) {
      drawChart(ctx, { x: 10, y: y + 4, w: width - 20, h: CHART_HEIGHT - 8 }, n.cogvxChart ?? emptyChart());
    },
    computeSize(width) {
      return [width, CHART_HEIGHT];
    },
  };
  if (node.addCustomWidget) node.addCustomWidget(widget);
  else (node.widgets ??= []).push(widget);
  return widget;
}

const app = await resolve(["app", "app"], "../../scripts/app.js", "app");
const api = await resolve(["api", "api"], "../../scripts/api.js", "api");

if (!app?.registerExtension) {
  console.warn("[CogVX] training.js: this frontend has no extension API; the loss chart is not shown.");
} else {
  app.registerExtension({
    name: "CogVX.Training",
    async setup() {
      api?.addEventListener?.("cogvx.train.progress", (event) => {
        const d = event?.detail ?? {};
        const node = app.graph?.getNodeById?.(Number(d.node)) ?? app.graph?.getNodeById?.(d.node);
        if (!node || node.type !== NODE_ID) return;
        node.cogvxChart = addPoint(node.cogvxChart ?? emptyChart(), d.step, d.loss, d.total, d.mean);
        node.setDirtyCanvas?.(true, false);
      });
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData?.name !== NODE_ID) return;
      chain(nodeType.prototype, "onNodeCreated", function () {
        this.cogvxChart = emptyChart();
        chartWidget(this);
        fitNode(this);
      });
      chain(nodeType.prototype, "onExecuted", function (message) {
        try {
          chartWidget(this);
          this.cogvxChart = setHistory(this.cogvxChart ?? emptyChart(), message);
          this.setDirtyCanvas?.(true, true);
        } catch (error) {
          console.warn("[CogVX] training.js: could not draw the loss chart:", error);
        }
      });
    },
  });
}
