"""The real ComfyUI frontend in headless Chromium, run by the host test with the host's python (it needs playwright):

    python browser_check.py URL TEMPLATE_NAMES.json OUT.json

TEMPLATE_NAMES.json lists the pack's template names (as GET /workflow_templates gives them) and the pack's folder
name. With the frontend's workflow validation on (the zod schema check), every template is fetched from
/api/workflow_templates/<pack>/<name>.json, as the template browser does, loaded into the editor and converted with
the frontend's own graphToPrompt. Alerts and toasts the frontend raises while loading (a schema failure is one) are
recorded per workflow, and so are node types the frontend does not know. A control workflow whose id is no UUID must
raise the schema alert: that shows the alerts are seen. Then a CogVXEmptyLatent node is created to check that
web/cogvx.js snaps its widgets. Writes {"validation": setting value, "prompts": {name: api prompt}, "alerts": {name:
[text]}, "missing": {name: [types]}, "control": [text], "snap": {...}, "errors": [console and page errors]}.
"""

import json
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

# Records what reaches the toast store (validation errors go through addAlert; other notices through add).
HOOK = """() => {
  window.__cogvxAlerts = [];
  const toast = window.app.extensionManager?.toast;
  if (!toast) return false;
  for (const method of ["add", "addAlert"]) {
    const original = toast[method];
    if (typeof original !== "function") continue;
    toast[method] = (message, ...rest) => {
      const text = typeof message === "string" ? message : [message?.summary, message?.detail].join(": ");
      if (typeof message === "string" || ["error", "warn"].includes(message?.severity)) {
        window.__cogvxAlerts.push(text);
      }
      return original.call(toast, message, ...rest);
    };
  }
  return true;
}"""

VALIDATION_ON = """async () => {
  const settings = window.app.extensionManager?.setting;
  if (settings?.set) await settings.set("Comfy.Validation.Workflows", true);
  return settings?.get ? settings.get("Comfy.Validation.Workflows") : null;
}"""

LOAD = """async ([url, name, body]) => {
  window.__cogvxAlerts = [];
  const wf = body ?? await (await fetch(url)).json();
  const missing = [...new Set(wf.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types)))];
  await app.loadGraphData(wf, true, true, name);
  await new Promise((r) => setTimeout(r, 300));
  const shown = [...document.querySelectorAll(".p-toast-message, .p-dialog")].map((e) => e.innerText.trim());
  const prompt = (await app.graphToPrompt()).output;
  return { prompt, missing, alerts: [...window.__cogvxAlerts, ...shown.filter((t) => t)] };
}"""

SNAP = """() => {
  const node = LiteGraph.createNode("CogVXEmptyLatent");
  app.graph.add(node);
  const w = (name) => node.widgets.find((x) => x.name === name);
  const set = (name, value) => { w(name).value = value; w(name).callback?.(value); };
  set("frames", 50);
  set("width", 700);
  set("variant", "5b-i2v");
  return { frames: w("frames").value, width: w("width").value, height: w("height").value,
           variant: w("variant").value };
}"""

CLEAR = """() => {
  window.app.extensionManager?.toast?.removeAll?.();
  document.querySelectorAll(".p-dialog-close-button, .p-dialog-header-close").forEach((b) => b.click());
}"""


def main() -> None:
    url, names_file, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    spec = json.loads(names_file.read_text())
    pack, names = spec["pack"], spec["names"]
    result = {"prompts": {}, "alerts": {}, "missing": {}, "errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on("console", lambda m: result["errors"].append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: result["errors"].append(str(e)))
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(2000)  # extensions finish registering
        result["validation"] = page.evaluate(VALIDATION_ON)
        result["hooked"] = page.evaluate(HOOK)
        first = names[0]
        for name in names:
            page.evaluate(CLEAR)
            page.wait_for_timeout(200)
            loaded = page.evaluate(LOAD, [f"{url}/api/workflow_templates/{pack}/{name}.json", name, None])
            result["prompts"][name] = loaded["prompt"]
            result["alerts"][name] = loaded["alerts"]
            result["missing"][name] = loaded["missing"]
        # The control: the first template with an id that is no UUID, which the schema refuses.
        page.evaluate(CLEAR)
        page.wait_for_timeout(200)
        template_url = f"{url}/api/workflow_templates/{pack}/{first}.json"
        body = page.evaluate("async (u) => (await fetch(u)).json()", template_url)
        body["id"] = "cogvx-not-a-uuid"
        result["control"] = page.evaluate(LOAD, [None, "control", body])["alerts"]
        page.evaluate(CLEAR)
        page.evaluate("() => app.graph.clear()")
        result["snap"] = page.evaluate(SNAP)
        browser.close()
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
