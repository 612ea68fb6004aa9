"""Interop with .NET's own pipes, both ways, through PowerShell:
NamedPipeClientStream against an npipe server, npipe's client against NamedPipeServerStream."""

from __future__ import annotations

import asyncio
import subprocess

import npipe

CLIENT = """
$d = [System.IO.Pipes.PipeDirection]::InOut
$c = New-Object System.IO.Pipes.NamedPipeClientStream('.', '{name}', $d)
$c.Connect(20000)
$w = New-Object System.IO.StreamWriter($c)
$w.AutoFlush = $true
$r = New-Object System.IO.StreamReader($c)
$w.WriteLine('hello from dotnet')
Write-Output ('reply: ' + $r.ReadLine())
$c.Dispose()
"""

SERVER = """
$d = [System.IO.Pipes.PipeDirection]::InOut
$m = [System.IO.Pipes.PipeTransmissionMode]::Byte
$s = New-Object System.IO.Pipes.NamedPipeServerStream('{name}', $d, 1, $m)
Write-Output 'listening'
$s.WaitForConnection()
$r = New-Object System.IO.StreamReader($s)
$w = New-Object System.IO.StreamWriter($s)
$w.AutoFlush = $true
$line = $r.ReadLine()
$w.WriteLine('dotnet got: ' + $line)
$s.WaitForPipeDrain()
$s.Dispose()
"""


def test_a_dotnet_client_calls_an_npipe_server(name: str, powershell: str) -> None:
    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()

    async def main() -> tuple[int, bytes, bytes]:
        async with await npipe.start_server(upper, name):
            proc = await asyncio.create_subprocess_exec(
                powershell, "-NoProfile", "-NonInteractive", "-Command",
                CLIENT.format(name=name),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            return proc.returncode or 0, out, err

    rc, out, err = asyncio.run(main())
    assert rc == 0, err.decode(errors="replace")
    assert "reply: HELLO FROM DOTNET" in out.decode(errors="replace"), (out, err)


def test_npipe_calls_a_dotnet_server(name: str, powershell: str) -> None:
    proc = subprocess.Popen(
        [powershell, "-NoProfile", "-NonInteractive", "-Command", SERVER.format(name=name)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        async def main() -> bytes:
            # PowerShell takes a while to start: the client retries a missing pipe.
            reader, writer = await npipe.open_connection(name, timeout=60)
            try:
                writer.write(b"hello from npipe\n")
                await writer.drain()
                return await asyncio.wait_for(reader.readline(), 30)
            finally:
                writer.close()

        assert asyncio.run(main()) == b"dotnet got: hello from npipe\r\n"
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
