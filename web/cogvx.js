// CogVX node widgets: frame-count and size widgets that snap to the chosen variant's valid values, and the notes a
// node returns (what it snapped, a cut prompt) shown on the node after a run.
//
// The rules come from the server: the `variant` combo's options carry `cogvx_rules` (see nodes/conditioning.py), so
// this file holds no model data. Only the classic extension API is used (registerExtension, beforeRegisterNodeDef,
// onNodeCreated, onExecuted, widget callbacks), each chained onto the original; on a frontend without it, the file
// logs one warning and does nothing. Python snaps again on every run: API prompts never pass through this file.

import { chain, fitNode, resolve, textBox } from "./common.js";

const SIZE_STEP = 16;
const NOTES_WIDGET = "cogvx_notes";

// ---- the rules (a port of cogvx_core.variants.snap_request for released models) --------------------------------

export function snapFrames(frames) {
  return Math.max(1, 4 * Math.floor((Math.max(frames, 1) - 1) / 4 + 0.5) + 1);
}

function nearest(value, step, lowest) {
  return Math.max(lowest, Math.round(value / step) * step);
}

// [width, height] valid for the variant; 0 stays 0 where it means "the image's own size".
export function snapSize(rule, width, height, zeroAllowed) {
  if (zeroAllowed && (width === 0 || height === 0)) return [width, height];
  if (rule.positions === "rope+learned") return [rule.width, rule.height];
  if (rule.i2v && rule.generation === "1.5") {
    const landscape = height <= width;
    const [short, long] = landscape ? [height, width] : [width, height];
    const newLong = Math.min(1360, Math.max(768, nearest((long * 768) / Math.max(short, 1), SIZE_STEP, SIZE_STEP)));
    return landscape ? [newLong, 768] : [768, newLong];
  }
  return [nearest(width, SIZE_STEP, SIZE_STEP), nearest(height, SIZE_STEP, SIZE_STEP)];
}

// ---- widgets -----------------------------------------------------------------------------------------------------

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function attachSnapping(node, rules) {
  const variant = widget(node, "variant");
  const frames = widget(node, "frames");
  const width = widget(node, "width");
  const height = widget(node, "height");
  if (!variant || !frames || !width || !height) return;
  const zeroAllowed = (width.options?.min ?? SIZE_STEP) === 0;
  let previous = rules[variant.value];
  let busy = false;

  const snap = () => {
    const rule = rules[variant.value];
    if (!rule || busy) return;
    busy = true;
    try {
      frames.value = snapFrames(Number(frames.value));
      const [w, h] = snapSize(rule, Number(width.value), Number(height.value), zeroAllowed);
      width.value = w;
      height.value = h;
    } finally {
      busy = false;
    }
    node.setDirtyCanvas?.(true, true);
  };

  const onVariant = () => {
    const rule = rules[variant.value];
    if (!rule) return;
    // Values still at the old variant's defaults follow the new variant's defaults.
    if (previous && Number(frames.value) === previous.frames) frames.value = rule.frames;
    if (previous && !zeroAllowed && Number(width.value) === previous.width && Number(height.value) === previous.height) {
      width.value = rule.width;
      height.value = rule.height;
    }
    previous = rule;
    snap();
  };

  chain(variant, "callback", onVariant);
  for (const w of [frames, width, height]) chain(w, "callback", snap);
}

function showNotes(node, lines, app, ComfyWidgets) {
  const text = lines.join("\n");
  if (!widget(node, NOTES_WIDGET) && !text) return; // no box until there is something to say
  textBox(node, NOTES_WIDGET, app, ComfyWidgets).value = text;
  fitNode(node);
}

// ---- registration ------------------------------------------------------------------------------------------------

export function register(app, ComfyWidgets) {
  app.registerExtension({
    name: "CogVX.Nodes",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (!nodeData?.name?.startsWith("CogVX") || nodeData.name === "CogVXCaptionUpsample") return;
      const rules = nodeData.input?.required?.variant?.[1]?.cogvx_rules;
      if (rules) {
        chain(nodeType.prototype, "onNodeCreated", function () {
          try {
            attachSnapping(this, rules);
          } catch (error) {
            console.warn("[CogVX] cogvx.js: could not attach the size rules:", error);
          }
        });
      }
      chain(nodeType.prototype, "onExecuted", function (message) {
        if (message?.text == null) return;
        try {
          const lines = Array.isArray(message.text) ? message.text.map(String) : [String(message.text)];
          showNotes(this, lines, app, ComfyWidgets);
        } catch (error) {
          console.warn("[CogVX] cogvx.js: could not show the notes:", error);
        }
      });
    },
  });
}

const app = await resolve(["app", "app"], "../../scripts/app.js", "app");
const ComfyWidgets = await resolve(["widgets", "ComfyWidgets"], "../../scripts/widgets.js", "ComfyWidgets");
if (app?.registerExtension) {
  register(app, ComfyWidgets);
} else {
  console.warn("[CogVX] cogvx.js: this frontend has no extension API; widgets are not snapped in the editor (the "
    + "nodes still snap every value when they run).");
}
