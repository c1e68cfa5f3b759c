// Shows the upsampled caption on the CogVXCaptionUpsample node once it has run (the node returns it as `ui.text`).
//
// Only the classic extension API is used (registerExtension, beforeRegisterNodeDef, onExecuted), chained onto any
// existing handler. `app` and `ComfyWidgets` come from window.comfyAPI on current frontends and from the legacy
// module paths on old ones; if neither is there, the extension logs a warning and does nothing else.

import { chain, fitNode, resolve, textBox } from "./common.js";

const NODE_ID = "CogVXCaptionUpsample";
const WIDGET_NAME = "upsampled";

// A read-only text box under the node's widgets; created on the first result, reused after.
function showText(node, text, app, ComfyWidgets) {
  textBox(node, WIDGET_NAME, app, ComfyWidgets).value = text;
  fitNode(node);
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
      chain(nodeType.prototype, "onExecuted", function (message) {
        const text = message?.text;
        if (text == null) return;
        try {
          showText(this, Array.isArray(text) ? text.join("\n") : String(text), app, ComfyWidgets);
        } catch (error) {
          console.warn("[CogVX] caption.js: could not show the upsampled text:", error);
        }
      });
    },
  });
}
