"""TLS for the REST API: the controller's server context and the clients' verifying one.

Verification is never turned off: a client trusts exactly the CA file it is given, or the
system's store when it is given none. Files are checked before OpenSSL sees them, so a bad
one is named with what is wrong with it (and OpenSSL never prompts for a key's passphrase).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from imageswarm.agent.errors import InvalidInputError
from imageswarm.daemon.config import Config
from imageswarm.daemon.errors import ConfigError


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the {what} {path} ({exc.strerror})") from None


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The context the controller serves HTTPS with; InvalidInputError names the bad file."""
    try:
        leaf = x509.load_pem_x509_certificates(_read(cert, "certificate"))[0]
    except ValueError:
        raise InvalidInputError(f"{cert} is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(_read(key, "private key"), password=None)
    except TypeError:
        raise InvalidInputError(f"{key} is encrypted; give an unencrypted private key") from None
    except ValueError:
        raise InvalidInputError(f"{key} is not a PEM private key") from None
    if private.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
        raise InvalidInputError(f"the private key {key} does not belong to the certificate {cert}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise InvalidInputError(f"{cert} and {key} are unusable: {exc.reason or exc}") from None
    return context


def client_context(ca: Path | None) -> ssl.SSLContext:
    """A verifying client context: trust `ca` only, or the system's store when None."""
    if ca is None:
        return ssl.create_default_context()
    _read(ca, "CA certificate")
    try:
        return ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise InvalidInputError(f"{ca} is not a PEM CA certificate ({exc.reason or exc})") from None


def load(config: Config) -> ssl.SSLContext | None:
    """Check every TLS file the config names, at startup; return the REST API's server context
    (None: plain HTTP). ConfigError names the config file, the key and the file at fault."""
    try:
        if config.controller_ca is not None:
            client_context(config.controller_ca)
    except InvalidInputError as exc:
        raise ConfigError(f"{config.path}: key 'controller_ca': {exc}") from None
    if config.tls is None:
        return None
    try:
        return server_context(config.tls.cert, config.tls.key)
    except InvalidInputError as exc:
        raise ConfigError(f"{config.path}: key 'tls': {exc}") from None
