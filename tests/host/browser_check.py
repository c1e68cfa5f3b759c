"""The real ComfyUI frontend in headless Chromium, run by the host test with the host's python (it needs playwright):

    python browser_check.py URL WORKFLOW_DIR OUT.json

For every UI workflow in WORKFLOW_DIR: load it into the editor and convert it with the frontend's own graphToPrompt.
Then create a CogVXEmptyLatent node and check that web/cogvx.js snaps its widgets. Writes {"prompts": {name: api
prompt}, "snap": {...}, "errors": [console errors and page errors]}.
"""

import json
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

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


def main() -> None:
    url, folder, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    result = {"prompts": {}, "errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: result["errors"].append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: result["errors"].append(str(e)))
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(2000)  # extensions finish registering
        for path in sorted(folder.glob("*.json")):
            workflow = json.loads(path.read_text())
            prompt = page.evaluate("""async (wf) => {
                await app.loadGraphData(wf);
                return (await app.graphToPrompt()).output;
            }""", workflow)
            result["prompts"][path.stem] = prompt
        page.evaluate("() => app.graph.clear()")
        result["snap"] = page.evaluate(SNAP)
        browser.close()
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
