"""``distbelief keys``: CurveZMQ key pairs for ``--curve``."""

from __future__ import annotations

import click


@click.group()
def keys() -> None:
    """CurveZMQ keys for --curve (authentication and encryption)."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--client",
    "clients",
    multiple=True,
    default=("client",),
    show_default=True,
    help="Name of a client key pair to make and admit (repeat for several).",
)
@click.option("--force", is_flag=True, help="Replace existing keys (locks old clients out).")
def keys_generate(directory, clients, force) -> None:
    """Write a server key pair and client key pairs into DIRECTORY."""
    from distbelief.curve import CurveError, generate_keys

    if "client" not in clients:
        clients = ("client", *clients)  # the pair --curve DIR uses on this host
    try:
        written = generate_keys(directory, clients, force=force)
    except CurveError as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(path)
    click.echo(
        f"servers: --curve {directory} (server.key_secret, clients/*.key); "
        f"clients: --curve with server.key and their own client.key_secret"
    )
