"""Who to authenticate as when opening a remote pipe over SMB.

Arguments win, then the environment (``NPIPE_USER``, ``NPIPE_PASSWORD``,
``NPIPE_DOMAIN``); with no user and no password pyspnego falls back to the Kerberos
credential cache (``kinit``), which needs PyPI's ``gssapi``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass

AUTH_PROTOCOLS = ("negotiate", "ntlm", "kerberos")

ENV_USER = "NPIPE_USER"
ENV_PASSWORD = "NPIPE_PASSWORD"
ENV_DOMAIN = "NPIPE_DOMAIN"
ENV_AUTH_PROTOCOL = "NPIPE_AUTH_PROTOCOL"

# Keys the password digest in identity(): equal passwords compare equal within this
# process, and the digest is useless to anyone who reads it from a dump or a log.
_DIGEST_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class Credentials:
    """A user, password and domain (any may be None) and the SPNEGO protocol to use.

    ``username`` never carries a domain: ``DOMAIN\\user`` and ``user@realm`` given to
    :meth:`resolve` are split into ``username`` and ``domain``. :attr:`principal` puts
    them back together in the form pyspnego wants.
    """

    username: str | None = None
    password: str | None = None
    domain: str | None = None
    auth_protocol: str = "negotiate"

    def __post_init__(self) -> None:
        if self.auth_protocol not in AUTH_PROTOCOLS:
            from npipe.errors import ConfigError

            raise ConfigError(
                f"unknown auth_protocol {self.auth_protocol!r}: use one of "
                + ", ".join(AUTH_PROTOCOLS)
            )

    @classmethod
    def resolve(
        cls,
        username: str | None = None,
        password: str | None = None,
        domain: str | None = None,
        auth_protocol: str | None = None,
    ) -> Credentials:
        """Arguments first, then NPIPE_USER / NPIPE_PASSWORD / NPIPE_DOMAIN, else None.

        The environment fills only what the arguments leave out, except that a password
        from the environment goes only with the user from the environment: an explicit
        other user never gets NPIPE_PASSWORD. The domain is the argument, else the one
        in ``DOMAIN\\user`` / ``user@realm``, else NPIPE_DOMAIN. ``NPIPE_AUTH_PROTOCOL``
        may name ``negotiate`` (the default), ``ntlm`` or ``kerberos``.
        """
        env_user = os.environ.get(ENV_USER) or None
        env_password = os.environ.get(ENV_PASSWORD)
        if username is None:
            username = env_user
            if password is None:
                password = env_password
        elif password is None and username == env_user:
            password = env_password
        # The domain: the argument, else the one in DOMAIN\\user or user@realm, else
        # NPIPE_DOMAIN.
        user, embedded = split_username(username)
        if domain is None:
            domain = embedded or os.environ.get(ENV_DOMAIN) or None
        if auth_protocol is None:
            auth_protocol = os.environ.get(ENV_AUTH_PROTOCOL) or "negotiate"
        return cls(user, password, domain, auth_protocol.lower())

    @property
    def principal(self) -> str | None:
        """The user name as pyspnego takes it: ``user``, ``DOMAIN\\user`` or ``user@realm``.

        A domain with a dot (a DNS name or Kerberos realm) or any domain under Kerberos
        gives ``user@domain``, which NTLM accepts too; a NetBIOS domain gives
        ``DOMAIN\\user``.
        """
        if self.username is None:
            return None
        if not self.domain:
            return self.username
        if self.auth_protocol == "kerberos" or "." in self.domain:
            return f"{self.username}@{self.domain}"
        return f"{self.domain}\\{self.username}"

    def describe(self) -> str:
        """Who these credentials are, for messages (never the password)."""
        if self.username is None:
            return "the default Kerberos credentials (no NPIPE_USER set)"
        return repr(self.principal)

    def identity(self) -> tuple[str | None, str | None, str, str | None]:
        """What makes two credentials share an SMB session: user, domain, protocol and
        a keyed digest of the password (so a wrong password never reuses a good session).
        """
        digest = None
        if self.password is not None:
            digest = hashlib.blake2b(
                self.password.encode(), key=_DIGEST_KEY, digest_size=16
            ).hexdigest()
        user = self.username.lower() if self.username is not None else None
        domain = self.domain.lower() if self.domain is not None else None
        return (user, domain, self.auth_protocol, digest)

    def __repr__(self) -> str:
        password = "None" if self.password is None else "'***'"
        return (
            f"Credentials(username={self.username!r}, password={password}, "
            f"domain={self.domain!r}, auth_protocol={self.auth_protocol!r})"
        )

    __str__ = __repr__


def split_username(username: str | None) -> tuple[str | None, str | None]:
    """``DOMAIN\\user`` -> (user, DOMAIN); ``user@realm`` -> (user, realm); else (name, None)."""
    if not username:
        return None, None
    if "\\" in username:
        domain, _, user = username.partition("\\")
        return user, domain or None
    if "@" in username:
        user, _, realm = username.rpartition("@")
        if user and realm:
            return user, realm
    return username, None


__all__ = ["AUTH_PROTOCOLS", "Credentials", "split_username"]
