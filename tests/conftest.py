import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


import pytest  # noqa: E402

# .ci/run sets this where it has installed every extra: there a missing extra fails its tests
# instead of skipping them, so a broken install step cannot pass as a skip.
REQUIRE_EXTRAS = os.environ.get("SIP_REQUIRE_EXTRAS") == "1"
EXTRA_FIXTURES = {"smollm2", "smollm2_server", "vllm_installed", "trl_installed"}


def pytest_collection_modifyitems(items):
    """Marks every test that needs an optional extra, so `-m extras` selects exactly those."""
    for item in items:
        if EXTRA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.extras)


@pytest.fixture(scope="module")
def ray_cluster(request):
    """A local Ray cluster for one test module (8 logical CPUs, or the module's RAY_CPUS), shut down after it
    together with any Serve instance its tests started. Modules that need it say
    `pytestmark = pytest.mark.usefixtures("ray_cluster")`."""
    import ray

    ray.init(address="local", num_cpus=getattr(request.module, "RAY_CPUS", 8), include_dashboard=False,
             log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The tokenizer of the learner tests' tiny world (5 countries, 5 elements, 400 tokens), trained once."""
    from sip.config import load_config
    from sip.train.data import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(load_config(None, ["data.world.countries=5", "data.world.elements=5", "data.tokenizer_docs=200",
                                       "data.vocab_size=400"]).data, out)
    return out


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as an HF folder, converted once per machine (about 30 s the first time)."""
    from sip.serve.smollm2 import INSTALL_HINT, convert, gguf_folder

    try:
        gguf_folder()
        import gguf  # noqa: F401  (the conversion needs it)
    except (FileNotFoundError, ImportError) as err:
        if REQUIRE_EXTRAS:
            pytest.fail(f"SIP_REQUIRE_EXTRAS=1 but SmolLM2 is not installed ({err}): {INSTALL_HINT}")
        pytest.skip(f"SmolLM2 is not installed ({err}); to enable: {INSTALL_HINT}")
    return convert()


@pytest.fixture
def vllm_installed():
    """Skips the test, saying how to install vLLM, when it is missing (fails it in CI, which installs it)."""
    import importlib.util

    from sip.vllm_adapter import INSTALL_HINT

    if importlib.util.find_spec("vllm") is None:
        if REQUIRE_EXTRAS:
            pytest.fail(f"SIP_REQUIRE_EXTRAS=1 but vLLM is not installed: {INSTALL_HINT}")
        pytest.skip(f"vLLM is not installed; to run the vLLM tests: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def trl_installed():
    """Skips the test, saying how to install TRL (judge training), when it is missing."""
    import importlib.util

    hint = "pip install -e '.[judge]'"
    if importlib.util.find_spec("trl") is None:
        if REQUIRE_EXTRAS:
            pytest.fail(f"SIP_REQUIRE_EXTRAS=1 but TRL is not installed: {hint}")
        pytest.skip(f"TRL is not installed; to run the judge-training tests: {hint}")


SERVER_KEY_ENV = "SIP_TEST_OPENAI_KEY"
# Set before any test starts Ray: Serve replicas read the key from the environment they inherit.
os.environ.setdefault(SERVER_KEY_ENV, "sk-test-" + os.urandom(8).hex())


@pytest.fixture(scope="session")
def smollm2_server(smollm2, tmp_path_factory):
    """A real OpenAI-compatible server (sip.serve.openai_server) with SmolLM2 on a free 127.0.0.1 port.

    It demands the key in SIP_TEST_OPENAI_KEY, set for this test session when conftest is imported.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    key = os.environ[SERVER_KEY_ENV]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "sip.serve.openai_server", "--model", str(smollm2), "--port", str(port),
           "--api-key-env", SERVER_KEY_ENV, "--torch-threads", "2"]
    log = tmp_path_factory.mktemp("openai_server") / "server.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        try:
            request = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the OpenAI-compatible test server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    yield base_url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
