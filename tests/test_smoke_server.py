def test_dog_over_http(client, images):
    r = client.post("/predict", files={"image": ("dog.jpg", (images / "dog.jpg").read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    labels = {d["label"] for d in r.json()["detections"]}
    assert {"dog", "bicycle", "car"} <= labels
