"""``hive-core`` / ``python -m hyperhive.core``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hyperhive.activation import NotActivated, inherited_listeners
from hyperhive.config import CONFIG_REFUSED, ConfigError, load_config
from hyperhive.core.confine import NotConfined, check_groups, not_dumpable
from hyperhive.core.daemon import CORE_SOCK, HOST_SOCK, CoreOptions, default_paths, main_with
from hyperhive.unixsock import refuse_descriptors


@click.command(help="The hive's core daemon (normally started by `hive up` or systemd).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="hive.toml")
@click.option("--run-dir", type=click.Path(path_type=Path), help="sockets (default /run/hive)")
@click.option("--state-dir", type=click.Path(path_type=Path), help="state (default /var/lib/hive)")
@click.option("--listen", help="HOST:PORT of the gateway (overrides [hive] listen)")
@click.option(
    "--priv-sock",
    type=click.Path(path_type=Path),
    help="hive-priv's socket: run agents in cages (without it, agents are sockets only)",
)
@click.option(
    "--synchronous",
    type=click.Choice(["NORMAL", "FULL"]),
    default="NORMAL",
    show_default=True,
    help="SQLite durability: NORMAL survives a crash of the process, FULL also power loss",
)
def main(
    config_path: Path | None,
    run_dir: Path | None,
    state_dir: Path | None,
    listen: str | None,
    priv_sock: Path | None,
    synchronous: str,
) -> None:
    try:
        config = load_config(config_path, listen)
    except ConfigError as e:
        print(f"hive-core: {e}", file=sys.stderr)
        raise SystemExit(CONFIG_REFUSED) from None
    runs, states = default_paths(run_dir, state_dir)
    try:
        check_groups()
        not_dumpable()
        handed = inherited_listeners((HOST_SOCK, CORE_SOCK))
        for listener in handed.values():  # systemd's: neither protocol carries descriptors
            refuse_descriptors(listener)
    except (NotActivated, NotConfined) as e:
        raise click.ClickException(str(e)) from None
    opts = CoreOptions(config, runs, states, synchronous, priv_sock, handed)
    raise SystemExit(main_with(opts))


if __name__ == "__main__":
    main()
