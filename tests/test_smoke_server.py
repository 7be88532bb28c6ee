def test_log_says_where_it_listens(server):
    # The server binds its socket itself (so a busy port fails first), and says so as uvicorn did.
    assert f"visionserve: listening on {server.url}" in server.output()
