"""Dead-peer checks run inside the client's network namespace (tests/test_dead_peer.py).

    python dead_peer_app.py SCENARIO ADDRESS TIMEOUT

Talks to a raw echo server (tests/cross_host/server_app.py raw: a greeting line, then
echoes) with the native client and ``Options(dead_peer_timeout=TIMEOUT)``; prints one JSON
line per step. Credentials come from NPIPE_USER / NPIPE_PASSWORD.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from npipe.address import parse_address
from npipe.errors import NpipeError
from npipe.smb.credentials import Credentials
from npipe.smb.native import NativeClient, Options

# No step waits longer than this: a hang shows as "hung", not as a stuck test.
BOUND = 30.0


def say(**result: Any) -> None:
    print(json.dumps(result), flush=True)


async def stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def open_raw(client: NativeClient, address: str) -> tuple[Any, Any]:
    reader, writer = await client.open_pipe(parse_address(address),
                                            credentials=Credentials.resolve(), timeout=10)
    greeting = await asyncio.wait_for(reader.readline(), BOUND)
    assert greeting.startswith(b"hello "), greeting
    return reader, writer


async def dead(address: str, timeout: float) -> None:
    """Open a pipe and keep a read pending; say "opened" (the test then silences the
    link) and how the read ended, and how long after "opened" it did. Then, on a line
    from stdin (the link is back), open a new pipe and echo through it."""
    client = NativeClient(Options(dead_peer_timeout=timeout))
    reader, writer = await open_raw(client, address)
    say(opened=True)
    start = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(100), BOUND)
        outcome = "eof" if not data else f"data {data!r}"
    except asyncio.TimeoutError:
        outcome = "hung"
    except (NpipeError, OSError) as exc:
        outcome = type(exc).__name__
        say(message=str(exc))
    say(read=outcome, seconds=round(time.monotonic() - start, 2),
        alive=writer.transport.link.alive)
    writer.close()
    await stdin_line()
    reader, writer = await open_raw(client, address)
    writer.write(b"back again")
    echoed = await asyncio.wait_for(reader.readexactly(10), BOUND)
    say(recovered=echoed == b"back again")
    writer.close()


async def healthy(address: str, timeout: float) -> None:
    """A quiet pipe (a READ posted, the server silent) and a quiet connection (no pipes)
    over several timeouts, then a busy one: nothing is dropped, and ECHOs go only where
    requests wait unanswered."""
    client = NativeClient(Options(dead_peer_timeout=timeout))
    reader, writer = await open_raw(client, address)
    link = writer.transport.link
    await asyncio.sleep(4 * timeout)  # the server says nothing all this time
    quiet_echoes = link.echoes
    writer.write(b"still here")
    echoed = await asyncio.wait_for(reader.readexactly(10), BOUND)

    # Busy: a steady request/answer stream for several timeouts. Answers keep coming,
    # so no ECHO is added.
    busy_start = link.echoes
    chunk = b"x" * 4096
    deadline = time.monotonic() + 3 * timeout
    rounds = 0
    while time.monotonic() < deadline:
        writer.write(chunk)
        await asyncio.wait_for(reader.readexactly(len(chunk)), BOUND)
        rounds += 1
        await asyncio.sleep(timeout / 20)
    busy_echoes = link.echoes - busy_start
    writer.close()
    await asyncio.sleep(0.2)  # the CLOSE is answered: nothing is pending any more

    # Idle: no pipes, nothing pending. No ECHO: TCP keepalive watches it.
    idle_start = link.echoes
    await asyncio.sleep(3 * timeout)
    idle_echoes = link.echoes - idle_start
    reader, writer = await open_raw(client, address)
    same = writer.transport.link is link
    writer.close()
    say(echoed=echoed == b"still here", quiet_echoes=quiet_echoes, busy_echoes=busy_echoes,
        rounds=rounds, idle_echoes=idle_echoes, same_connection=same, alive=link.alive)


if __name__ == "__main__":
    scenario, address, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    asyncio.run(globals()[scenario](address, timeout))
