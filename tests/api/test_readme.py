"""The client half of the README's curl session, run as written (one shell, in order) against
`switchyard serve` with real workers: only the API's address is this test server's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.fake_claude import FakeClaude
from tests.api.conftest import Server
from tests.cluster import SWITCHYARD, Cluster

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## HTTP API"


def client_session() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.find("\n## ", len(SECTION))]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2, "the section has a server block and a client block"
    return blocks[1]


@pytest.mark.e2e
def test_readme_curl_session_works_as_written(cluster_server: Server, broker_url: str, fake_claude: FakeClaude,
                                              tmp_path: Path) -> None:
    server = cluster_server
    script = client_session()
    assert "API=http://127.0.0.1:8000\n" in script
    script = script.replace("API=http://127.0.0.1:8000\n", f"API={server.url}\n", 1)
    (tmp_path / "pipeline" / "samples").mkdir(parents=True)
    shutil.copy(ROOT / "pipeline" / "samples" / "demo.jsonl", tmp_path / "pipeline" / "samples" / "demo.jsonl")
    env = dict(server.env, PATH=f"{Path(SWITCHYARD).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    cluster = Cluster(database_url=server.database_url, broker_url=broker_url, claude_url=fake_claude.base_url,
                      workdir=tmp_path)
    try:
        cluster.start_all(concurrency=4)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240, check=False)
    finally:
        cluster.stop()
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{cluster.logs()}"

    results = [json.loads(line) for line in (tmp_path / "tickets-results.jsonl").read_text().splitlines()]
    assert len(results) == 52  # the sample's 51 jobs and the one added alone
    assert all(r["status"] == "succeeded" for r in results)
    assert proc.stdout.rstrip().endswith('{"detail":"a classify job needs \'labels\', a list of the allowed labels"}')
