"""Detect objects in an image with the deepstack-python client, as its documentation shows.

    pip install deepstack-python
    python examples/deepstack_detect.py dog.jpg [--ip localhost] [--port 9130] [--api-key KEY]

Prints a summary of the objects found, then one line per prediction.
"""

import argparse

import deepstack.core as ds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--ip", default="localhost")
    parser.add_argument("--port", type=int, default=9130)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--custom-model", default="")
    args = parser.parse_args()

    dsobject = ds.DeepstackObject(
        ip=args.ip, port=args.port, api_key=args.api_key, timeout=30, custom_model=args.custom_model
    )
    with open(args.image, "rb") as f:
        image_bytes = f.read()
    predictions = dsobject.detect(image_bytes)

    print(ds.get_objects_summary(predictions))
    for p in predictions:
        print(f"{p['label']} {p['confidence']:.3f} [{p['x_min']}, {p['y_min']}, {p['x_max']}, {p['y_max']}]")


if __name__ == "__main__":
    main()
