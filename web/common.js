// Helpers the CogVX extensions share (cogvx.js, caption.js, training.js import them).
//
// ComfyUI loads every .js file of WEB_DIRECTORY as a module, this one included: it only defines functions, so
// loading it on its own registers nothing and changes nothing.

// An object from the frontend: window.comfyAPI on current frontends, the legacy module path on old ones, else null.
export async function resolve(globalPath, modulePath, exportName) {
  const fromGlobal = globalPath.reduce((obj, key) => obj?.[key], globalThis.window?.comfyAPI);
  if (fromGlobal) return fromGlobal;
  try {
    return (await import(modulePath))[exportName] ?? null;
  } catch {
    return null;
  }
}

// Runs `after` after the existing object[name] (if any), keeping the original's return value.
export function chain(object, name, after) {
  const original = object[name];
  object[name] = function () {
    const result = original?.apply(this, arguments);
    after.apply(this, arguments);
    return result;
  };
}

// A read-only text box named `name` under the node's widgets: found, or made on first use. Display only: kept out
// of the saved workflow's widgets_values and out of the API prompt.
export function textBox(node, name, app, ComfyWidgets) {
  let box = node.widgets?.find((w) => w.name === name);
  if (box) return box;
  box = ComfyWidgets?.STRING
    ? ComfyWidgets.STRING(node, name, ["STRING", { multiline: true }], app).widget
    : node.addWidget("text", name, "", () => {}, {});
  if (box.inputEl) {
    box.inputEl.readOnly = true;
    box.inputEl.style.opacity = 0.75;
  }
  box.serialize = false;
  box.options = box.options ?? {};
  box.options.serialize = false;
  return box;
}

// Grows the node to fit its widgets (never shrinks what the user sized) and asks for a redraw.
export function fitNode(node) {
  if (node.computeSize && node.setSize) {
    const size = node.computeSize();
    node.setSize([Math.max(node.size?.[0] ?? 0, size[0]), Math.max(node.size?.[1] ?? 0, size[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}
