"""Windows-native named pipes.

The platform-neutral parts (importable and tested everywhere):

- :mod:`npipe.windows.sddl`: the pipe's security descriptor (SDDL) from an ``Acl``;
- :mod:`npipe.windows.names`: pipe addresses as Windows paths (``\\\\.\\pipe\\NAME``);
- :mod:`npipe.windows.errors`: Win32 error codes as npipe's exceptions;
- :mod:`npipe.windows.waiting`: the client's busy/missing-pipe wait policy (sans I/O);
- :mod:`npipe.windows.identity`: callers from token data, the ACL check, server checks.

(``npipe service``, the Windows service host around a serve command, is part of the CLI:
npipe.cli.winservice_host.)

The Windows-only I/O (ctypes and the proactor) lives in ``win32`` and ``pipes``, which
nothing here imports.
"""
