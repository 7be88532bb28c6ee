def test_dog_over_http(client, images):
    r = client.post("/predict", files={"image": ("dog.jpg", (images / "dog.jpg").read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    labels = {d["label"] for d in r.json()["detections"]}
    assert {"dog", "bicycle", "car"} <= labels


def test_log_says_where_it_listens(server):
    # The server binds its socket itself (so a busy port fails first), and says so as uvicorn did.
    assert f"visionserve: listening on {server.url}" in server.output()
