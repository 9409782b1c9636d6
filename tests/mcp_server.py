"""A real MCP server (the official SDK, streamable HTTP) for the gateway tests, on loopback."""

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("airlock-test-tools")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@server.tool()
def read_file(path: str) -> str:
    """Pretend to read a file."""
    return f"contents of {path}"


@server.tool()
def shell(command: str) -> str:
    """A tool no agent should get."""
    return f"ran {command}"


if __name__ == "__main__":
    port = int(sys.argv[1])
    if len(sys.argv) == 4:  # a certificate and its key: streamable HTTP over TLS
        import uvicorn

        uvicorn.run(
            server.streamable_http_app(),
            host="127.0.0.1",
            port=port,
            ssl_certfile=sys.argv[2],
            ssl_keyfile=sys.argv[3],
            log_level="warning",
        )
    else:
        server.run("streamable-http", host="127.0.0.1", port=port)
