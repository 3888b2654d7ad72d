"""The production gateway config in deploy/ is the template rendered with the
default paths, and nginx accepts it."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from hyperhive.gateway.config import render

ROOT = Path(__file__).resolve().parent.parent
DEPLOYED = ROOT / "deploy" / "nginx" / "hive-gateway.conf"


def _body(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_deploy_config_is_the_rendered_template() -> None:
    rendered = render("127.0.0.1:8080", Path("/run/hive"), Path("/run/hive/gateway"))
    assert _body(DEPLOYED.read_text()) == _body(rendered)


def test_nginx_accepts_the_config() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "tmp").mkdir()
        conf = base / "nginx.conf"
        # Same template, paths moved into a temp dir so nginx -t can open them.
        conf.write_text(render("127.0.0.1:18099", base, base, user="nobody").replace("user nobody nobody;",
                                                                                     "user nobody nogroup;"))
        result = subprocess.run(["nginx", "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "syntax is ok" in result.stderr
        broken = base / "broken.conf"
        broken.write_text(conf.read_text().replace("auth_request /_hive_auth;", "auth_request;"))
        bad = subprocess.run(["nginx", "-t", "-c", str(broken)], capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0  # the check can fail
