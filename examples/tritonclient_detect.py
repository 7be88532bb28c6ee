"""Detect objects in an image with NVIDIA's tritonclient (HTTP), as its documentation shows.

    pip install "tritonclient[http]"
    python examples/tritonclient_detect.py dog.jpg [--url localhost:9130] [--model yolox-nano]

The image is sent encoded (a BYTES tensor named IMAGE, binary tensor extension); the server
decodes it. Prints one line per detection: label, confidence, box.
"""

import argparse

import numpy as np
import tritonclient.http as httpclient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--url", default="localhost:9130")
    parser.add_argument("--model", default="yolox-nano")
    args = parser.parse_args()

    client = httpclient.InferenceServerClient(url=args.url)
    if not client.is_server_live() or not client.is_model_ready(args.model):
        raise SystemExit(f"model {args.model} is not ready at {args.url}")

    with open(args.image, "rb") as f:
        image = np.array([f.read()], dtype=np.object_)
    inputs = [httpclient.InferInput("IMAGE", [1], "BYTES")]
    inputs[0].set_data_from_numpy(image, binary_data=True)
    outputs = [
        httpclient.InferRequestedOutput("BOXES", binary_data=True),
        httpclient.InferRequestedOutput("SCORES", binary_data=True),
        httpclient.InferRequestedOutput("LABELS", binary_data=True),
    ]
    result = client.infer(args.model, inputs, outputs=outputs, parameters={"min_confidence": 0.4})

    for label, score, box in zip(result.as_numpy("LABELS"), result.as_numpy("SCORES"), result.as_numpy("BOXES")):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        print(f"{label.decode()} {score:.3f} [{x1}, {y1}, {x2}, {y2}]")


if __name__ == "__main__":
    main()
