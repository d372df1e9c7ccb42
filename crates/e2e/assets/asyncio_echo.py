#!/usr/bin/env python3
"""asyncio echo: `asyncio_echo.py serve ADDR PORT` or `asyncio_echo.py client ADDR PORT`.
The client sends 200 messages of growing content, checks each echo, and
prints "asyncio ok BYTES"."""
import asyncio
import sys


async def handle(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def serve(addr, port):
    server = await asyncio.start_server(handle, addr, port)
    async with server:
        await server.serve_forever()


async def client(addr, port):
    reader, writer = await asyncio.open_connection(addr, port)
    total = 0
    for i in range(200):
        message = (b"%d-" % i) * 500
        writer.write(message)
        await writer.drain()
        echo = await reader.readexactly(len(message))
        assert echo == message, f"message {i} came back different"
        total += len(echo)
    writer.close()
    print("asyncio ok", total, flush=True)


if __name__ == "__main__":
    run = serve if sys.argv[1] == "serve" else client
    asyncio.run(run(sys.argv[2], int(sys.argv[3])))
