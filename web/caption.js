// Shows the upsampled caption on the CogVXCaptionUpsample node once it has run (the node returns it as `ui.text`).
//
// Only the classic extension API is used (registerExtension, beforeRegisterNodeDef, onExecuted), chained onto any
// existing handler. `app` and `ComfyWidgets` come from window.comfyAPI on current frontends and from the legacy
// module paths on old ones; if neither is there, the extension logs a warning and does nothing else.

const NODE_ID = "CogVXCaptionUpsample";
const WIDGET_NAME = "upsampled";

async function resolve(globalPath, modulePath, exportName) {
  const fromGlobal = globalPath.reduce((obj, key) => obj?.[key], window.comfyAPI);
  if (fromGlobal) return fromGlobal;
  try {
    return (await import(modulePath))[exportName] ?? null;
  } catch {
    return null;
  }
}

// A read-only text box under the node's widgets; created on the first result, reused after.
function showText(node, text, app, ComfyWidgets) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets?.STRING
      ? ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget
      : node.addWidget("text", WIDGET_NAME, "", () => {}, {});
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.75;
    }
    // Display only: kept out of the saved workflow's widgets_values and out of the API prompt.
    widget.serialize = false;
    widget.options = widget.options ?? {};
    widget.options.serialize = false;
  }
  widget.value = text;
  if (node.computeSize && node.setSize) {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

const app = await resolve(["app", "app"], "../../scripts/app.js", "app");
const ComfyWidgets = await resolve(["widgets", "ComfyWidgets"], "../../scripts/widgets.js", "ComfyWidgets");

if (!app?.registerExtension) {
  console.warn("[CogVX] caption.js: this frontend has no extension API; the upsampled text is not shown on the node.");
} else {
  app.registerExtension({
    name: "CogVX.CaptionUpsample",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData?.name !== NODE_ID) return;
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const result = onExecuted?.apply(this, arguments);
        const text = message?.text;
        if (text != null) {
          try {
            showText(this, Array.isArray(text) ? text.join("\n") : String(text), app, ComfyWidgets);
          } catch (error) {
            console.warn("[CogVX] caption.js: could not show the upsampled text:", error);
          }
        }
        return result;
      };
    },
  });
}
