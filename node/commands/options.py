"""Command-line options shared by the commands that dial a swarm's members (health, eval, experts)."""

from __future__ import annotations

import argparse


def tls_options(p: argparse.ArgumentParser) -> None:
    """--tls and --tls-cert: how to reach members that serve TLS (node/host/trust.py, `client_tls`)."""
    p.add_argument("--tls", action="store_true", help="the nodes serve TLS with the certificate derived from "
                                                      "--swarm-key")
    p.add_argument("--tls-cert", metavar="PATH", default="", help="the nodes serve TLS with this certificate")
