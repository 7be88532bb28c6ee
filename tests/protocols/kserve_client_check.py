"""Run by test_v2_clients.py with KServe's own Python (kserve cannot share the main venv: it
pins protobuf below the version installed there). Talks to a running server with
``kserve.InferenceRESTClient`` over the V2 protocol and prints one JSON line of findings.

    python kserve_client_check.py URL MODEL IMAGE
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(url: str, model: str, image_path: str) -> dict:
    with open(image_path, "rb") as f:
        data = f.read()
    report: dict = {}
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        report["live"] = await client.is_server_live(url)
        report["ready"] = await client.is_server_ready(url)
        report["model_ready"] = await client.is_model_ready(url, model)

        # Encoded image as a binary BYTES tensor.
        image = InferInput(name="IMAGE", shape=[1], datatype="BYTES")
        image.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
        response = await client.infer(url, InferRequest(model_name=model, infer_inputs=[image]), model_name=model)
        report["binary"] = _labels(response)

        # Encoded image as base64 text in JSON (MLServer's content_type convention).
        b64 = InferInput(name="IMAGE", shape=[1], datatype="BYTES", data=[base64.b64encode(data).decode()],
                         parameters={"content_type": "base64"})
        response = await client.infer(url, InferRequest(model_name=model, infer_inputs=[b64]), model_name=model)
        report["base64"] = _labels(response)

        # Raw RGB pixels as a binary UINT8 tensor.
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        tensor = InferInput(name="PIXELS", shape=list(pixels.shape), datatype="UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=True)
        response = await client.infer(url, InferRequest(model_name=model, infer_inputs=[tensor]), model_name=model)
        report["pixels"] = _labels(response)
    finally:
        await client.close()
    return report


def _labels(response) -> list[str]:
    out = next(o for o in response.outputs if o.name == "LABELS")
    return [x.decode() if isinstance(x, bytes) else str(x) for x in out.as_numpy().reshape(-1)]


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
