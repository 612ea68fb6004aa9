"""Samba's side of remote pipes: the ``named_pipe_auth`` handshake smbd opens a pipe with.

``ndr`` reads the little NDR32 subset the handshake uses; ``npa`` is the sans-I/O codec
(request reader and parser, reply builder). Neither module does any I/O.
"""
