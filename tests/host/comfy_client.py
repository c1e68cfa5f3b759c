"""A headless ComfyUI client run by the host test with the host's own python (it has aiohttp):

    python comfy_client.py URL PROMPT.json OUT.json [--interrupt-after-progress N] [--timeout S]

Opens the websocket, POSTs the API prompt, records every message until the run ends (json messages as they are,
binary frames by their event type) and writes {"status": HTTP status of POST /prompt, "reply": its body,
"messages": [[type, data], ...], "binary": {type: count}, "history": GET /history/<id>}. With
--interrupt-after-progress N it POSTs /interrupt after the Nth progress message of the run.
"""

import argparse
import asyncio
import json
import struct
import time
import uuid

import aiohttp


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("prompt")
    ap.add_argument("out")
    ap.add_argument("--interrupt-after-progress", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    prompt = json.load(open(args.prompt))
    client_id = uuid.uuid4().hex
    result = {"messages": [], "binary": {}}
    deadline = time.monotonic() + args.timeout
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{args.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{args.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                result["status"] = r.status
                result["reply"] = await r.json()
            prompt_id = result["reply"].get("prompt_id")
            progress_seen = 0
            while prompt_id is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result["timed_out"] = True
                    break
                try:
                    msg = await ws.receive(timeout=remaining)
                except asyncio.TimeoutError:
                    result["timed_out"] = True
                    break
                if msg.type == aiohttp.WSMsgType.BINARY:
                    kind = str(struct.unpack(">I", msg.data[:4])[0])
                    result["binary"][kind] = result["binary"].get(kind, 0) + 1
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    result["closed"] = True
                    break
                data = json.loads(msg.data)
                kind, body = data.get("type"), data.get("data", {})
                if isinstance(body, dict) and body.get("prompt_id") not in (None, prompt_id):
                    continue
                result["messages"].append([kind, body])
                if kind == "progress":
                    progress_seen += 1
                    if progress_seen == args.interrupt_after_progress:
                        async with session.post(f"{args.url}/interrupt", json={}) as r:
                            result["interrupt_status"] = r.status
                if kind in ("execution_error", "execution_interrupted"):
                    break
                if kind == "executing" and body.get("node") is None and body.get("prompt_id") == prompt_id:
                    break
            if prompt_id is not None:
                for _ in range(50):  # history is written just after the last message
                    async with session.get(f"{args.url}/history/{prompt_id}") as r:
                        history = await r.json()
                    if prompt_id in history:
                        result["history"] = history[prompt_id]
                        break
                    await asyncio.sleep(0.1)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    asyncio.run(main())
